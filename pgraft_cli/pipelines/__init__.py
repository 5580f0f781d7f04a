"""One pipeline per verb, on one skeleton (``skeleton.py``): recipe, processes, model, device, run
directory, stages, report, gates. They return plain data; ``cli.py`` parses options and prints it.
Imports report, stages, io, models and core."""
