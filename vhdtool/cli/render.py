"""Human-readable rendering of an Inspection (JSON is Inspection.to_dict())."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vhdtool.editor import ChangeSet
    from vhdtool.guest.inspection import Inspection
    from vhdtool.plan.decide import Plan
    from vhdtool.plan.matrix import Matrix


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _yn(v) -> str:
    return "-" if v is None else ("yes" if v else "no")


def render_inspection(ins: Inspection) -> str:
    img = ins.image
    lines = [f"{img.path}"]
    lines.append(
        f"  image      {img.format}, {_size(img.virtual_size)} virtual, block {_size(img.block_size)}, "
        f"sectors {img.logical_sector_size}/{img.physical_sector_size}"
        + (f", differencing (parent {img.parent})" if img.differencing else "")
        + (", pending log replayed in memory" if img.log_replayed else "")
    )
    for p in ins.partitions:
        lines.append(
            f"  part {p.index:<5} {p.table} {p.type:<12} at {_size(p.offset):>10}  {_size(p.size):>10}  {p.filesystem or '-'}"
        )
    g = ins.guest
    if g.os is None:
        ntfs = ", ".join(str(p.index) for p in ins.partitions if p.filesystem == "ntfs")
        lines.append("  guest      no operating system (a data disk)")
        if ntfs:
            lines.append(f"  writable   NTFS on partition {ntfs}: copy-in --partition N writes there")
    if g.windows:
        w = g.windows
        sp = f" {w.service_pack}" if w.service_pack else ""
        ubr = f".{w.ubr}" if w.ubr is not None else ""
        lines.append(f"  guest      {w.product_name}{sp} ({w.version}.{w.build}{ubr}, {w.arch}, {w.installation_type})")
        lines.append(
            f"  system     partition {w.system_partition}, drive {w.drive_letter or '?'}:, ControlSet{w.control_set:03d}"
            if w.control_set is not None
            else f"  system     partition {w.system_partition}"
        )
        hives = ", ".join(f"{n} {'DIRTY' if s.dirty else 'clean'}" for n, s in w.hives)
        lines.append(
            f"  state      generalized {_yn(w.generalized)}, hibernated {_yn(w.hibernated)}, "
            f"NTFS clean {_yn(w.ntfs_clean)}, BitLocker {_yn(w.bitlocker)}; hives: {hives}"
        )
    if g.integration_services:
        ic = g.integration_services
        lines.append(f"  IC         version {ic.version or 'unknown'}" + (f" (from {ic.source})" if ic.source else ""))
        for s in ic.services:
            lines.append(f"    {s.name:<20} {s.start or '?'} ({s.start_value})")
        if ic.last_host:
            h = ic.last_host
            key = f", matrix host {h.host_key}" if h.host_key else ""
            vm = f", as VM {h.virtual_machine_name}" if h.virtual_machine_name else ""
            lines.append(f"  last host  {h.name or '?'} (Windows NT {h.os_version or '?'}{key}){vm}")
    if g.linux:
        lx = g.linux
        lines.append(f"  guest      {lx.pretty_name or lx.distribution} ({lx.distribution} {lx.version}), {lx.filesystem}")
        lines.append(f"  kernels    {', '.join(lx.kernels) or '-'}")
        lines.append("  hv modules " + ", ".join(f"{k} {_yn(v)}" for k, v in lx.hv_modules))
        lines.append("  daemons    " + ", ".join(f"{k} {_yn(v)}" for k, v in lx.daemons))
        for d in lx.services:
            lines.append(_linux_service_line(d.to_dict()))
    for w in ins.warnings:
        lines.append(f"  warning    {w}")
    return "\n".join(lines)


def render_matrix(matrix: Matrix, hosts: list[str]) -> str:
    lines = [f"matrix revision '{matrix.revision}': {matrix.description}"]
    for key in hosts:
        host = matrix.host(key)
        lines.append("")
        lines.append(f"host {key}: {host.name}" + (f"; {host.note}" if host.note else ""))
        for r in matrix.table(key):
            sp = f"SP{r.min_service_pack}+" if r.min_service_pack else ""
            de = "Data Exchange (*)" if r.requires_data_exchange else ""
            lines.append(f"  {r.guest:<18} {r.method:<26} {sp:<5} {de:<18} {r.note or ''}".rstrip())
    lines.append("")
    for name, text in matrix.footnotes:
        lines.append(f"(*) {text} [{name}]")
    return "\n".join(lines)


def render_plan(plan: Plan) -> str:
    lines = [plan.image]
    guest = " ".join(x for x in (plan.guest_key or "?", plan.arch) if x)
    lines.append(f"  guest      {guest}, integration services {plan.guest_ic_version or 'unknown'}")
    lines.append(f"  host       {plan.host or 'any'} (matrix revision '{plan.matrix_revision}')")
    lines.append(f"  method     {plan.method}")
    lines.append(f"  action     {plan.action}")
    if plan.cab:
        c = plan.cab
        kb = f"KB{c.kb}, " if c.kb else ""
        lines.append(f"  cab        {c.path} ({kb}{c.version}, {c.arch}, NT {c.nt}, sha256 {c.sha256[:16]}...)")
        if c.signature:
            lines.append(f"  signature  {c.signature} ({c.signature_reason})")
    if plan.packages:
        lines.append(f"  packages   {' '.join(plan.packages)} (with {plan.package_manager})")
    if plan.units:
        lines.append(f"  enables    {' '.join(plan.units)}")
    for r in plan.reasons:
        lines.append(f"  because    {r}")
    for n in plan.notes:
        lines.append(f"  note       {n}")
    return "\n".join(lines)


def render_edit(result: ChangeSet) -> str:
    where = result.output or result.image
    verb = "would change" if result.dry_run else ("changed" if result.committed else "unchanged")
    lines = [f"{where}: {verb}" + (f" (a copy of {result.image})" if result.output else "")]
    for f in result.files:
        size = f" ({_size(f.size)}, sha256 {f.sha256[:16]}...)" if f.size is not None else ""
        link = f" -> {f.target}" if f.target is not None else ""
        lines.append(f"  {f.action:<8} {f.path}{link}{size} on partition {f.partition}")
    for r in result.registry:
        lines.append(f"  registry {r.hive}\\{r.key}\\{r.name} ({r.type}): {r.old!r} -> {r.new!r}")
    lines.extend(f"  note     {n}" for n in result.notes)
    if result.committed and not result.dry_run:
        lines.append(f"  wrote    {_size(result.bytes_written)} to the image file"
                     + (", after replaying its pending log" if result.log_replayed else ""))
    return "\n".join(lines)


def _linux_service_line(s: dict) -> str:
    where = ", ".join(x for x in (s["unit"], s["daemon"]) if x)
    return f"    {s['name']:<20} {s['start']}" + (f" ({where})" if where else "")


def render_services(doc: dict) -> str:
    """The listing of ``vhdtool services IMAGE`` from its JSON document (Windows services or Linux daemons)."""
    services = doc["services"]
    lines = [doc["image"]]
    for s in services:
        if "start_value" not in s:  # a Linux guest's daemon
            lines.append(_linux_service_line(s)[2:])
            continue
        lines.append(f"  {s['name']:<20} {s['start'] or '?'} ({s['start_value']})")
    if not services:
        lines.append("  no integration services are installed")
    return "\n".join(lines)


def render_stage(result) -> str:
    lines = [render_plan(result.plan)]
    if result.staged:
        verb = "would stage" if result.edit and result.edit.dry_run else ("staged" if result.changed else "already staged")
        lines.append(f"  {verb:<10} {result.id}, boot hook {result.boot_hook['kind']}")
        for f in result.files:
            lines.append(f"    {f['path']} ({_size(f['size'])})")
        if result.boot_hook.get("link"):  # a Linux guest's unit, enabled by its link
            lines.append(f"    {result.boot_hook['link']} -> {result.boot_hook['target']}")
        if result.edit and result.edit.committed:
            lines.append(f"  wrote      {_size(result.edit.bytes_written)} to the image file")
    return "\n".join(lines)


def render_status(st) -> str:
    lines = [st.image, f"  state      {st.state}", f"  IC         version {st.ic_version or 'unknown'}"
             + (f" (from {st.ic_source})" if st.ic_source else "")]
    if st.servicing and st.servicing.restart_needed:
        keys = [k for k, on in (("RebootPending", st.servicing.reboot_pending),
                                ("PackagesPending", st.servicing.packages_pending)) if on]
        lines.append(f"  CBS        waits for a restart ({', '.join(keys)})")
    for s in st.staged:
        detail = f"exit code {s.exit_code}, " if s.exit_code is not None else ""
        detail += f"{s.attempts} attempt(s)" if s.attempts is not None else "not run yet"
        if s.finished:
            detail += f", finished {s.finished}"
        lines.append(f"  {s.id:<24} {s.state} ({detail})")
        if s.cbs is not None:
            cbs = s.cbs
            code = f" (CurrentState 0x{cbs.current_state:x})" if cbs.current_state is not None else ""
            lines.append(f"    CBS {cbs.state}{code}" + (f": {cbs.identity}" if cbs.identity else
                                                        ": package identity not recorded by this stage"))
        if s.state in ("failed", "inconsistent"):
            lines.extend(f"    | {line}" for line in s.log_tail)
    return "\n".join(lines)
