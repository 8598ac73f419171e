"""The shipped recipes (configs/) as a newcomer meets them: example data of every layout, a two-step run of a
recipe on its tiny random counterpart (``--smoke``), and what a run will read, do and need (``--plan``)."""
