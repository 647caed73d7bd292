"""Plan layer: the OS matrix (matrix), guest keys (guestkey), cab sources (sources), the decision (decide).

``from vhdtool.plan import plan, Plan`` loads the decision and what it needs on first use,
so ``vhdtool matrix`` does not load the cab reader.
"""

from __future__ import annotations


def __getattr__(name):
    if name in ("plan", "Plan"):
        from vhdtool.plan import decide

        return getattr(decide, name)
    raise AttributeError(name)
