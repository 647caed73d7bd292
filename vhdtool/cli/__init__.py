"""Command-line skin over the library: parse, call one function, render."""
