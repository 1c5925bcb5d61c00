"""The `ddpm` command line: `app.py` holds the typer app and the one error boundary, `main()`;
each command group lives in its own module exposing `register(app)`."""
