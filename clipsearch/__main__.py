from clipsearch.cli import app

app()
