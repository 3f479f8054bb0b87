"""Paper tables from run records (`lightning-ralora-tables`, cli/tables.py), one job per module, in the order a table
is made: `spec` (table.yaml -> TableSpec, the registry TABLES), `runs` (the run records a table reads), `extract`
(each table's metrics of one run, and its derived cells), `aggregate` (cells, columns, rows), `render` (cell text,
markdown, csv, W&B) and `build` (all of it, with the published values beside); `model` holds the Run and Cell types."""
