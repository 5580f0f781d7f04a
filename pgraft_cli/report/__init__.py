"""What a person reads: the HTML report, the terminal UI and the metric gates. Imports the layers below."""
