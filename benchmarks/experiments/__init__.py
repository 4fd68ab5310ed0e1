"""One-off studies behind figures in the docs; each writes JSON under benchmarks/results/ with the command that ran it."""
