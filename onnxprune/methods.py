"""The named methods: each is an (allocation, score) pair, the one registry the CLI's choices come from.

None as the allocation means "--allocation decides", with the default in the third field. Pure data, so that
the CLI starts without importing NumPy-heavy modules.
"""

METHODS = {
    "lamp": ("lamp", "magnitude", None),
    "global": ("global", "magnitude", None),
    "global-mt": ("global-mt", "magnitude", None),
    "uniform": ("uniform", "magnitude", None),
    "uniform+": ("uniform+", "magnitude", None),
    "erk": ("erk", "magnitude", None),
    "igq": ("igq", "magnitude", None),
    "random": (None, "random", "igq"),
    "lap": (None, "lap", "uniform"),
}
