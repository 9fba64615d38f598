"""The models: one file each, declared by the card at its top (`eagleflow.models.card`).

`catalog` lists them without importing torch (the Snakefile plans with it); `loading` builds and
loads one exactly from its published checkpoint; `checkpoints` reads files safely and checks keys;
`preprocess` turns tiles into each tile encoder's input.
"""
