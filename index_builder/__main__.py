from index_builder.cli import app

app(prog_name="python -m index_builder")
