"""eagleflow: the library behind the eagle-snakemake workflow.

Stages talk to each other only through the file formats in :mod:`eagleflow.h5io`.
"""

__version__ = "0.1.0"
