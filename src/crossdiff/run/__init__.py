"""`crossdiff run RECIPE` and `crossdiff demo`: every stage from one recipe file.

* ``stages``    the stage plan: skip finished stages, resume interrupted ones
* ``estimate``  ``--dry-run`` costs (time, memory, disk) before anything runs
* ``demo``      the recipe on the bundled model organism, and its printed summary
"""

from crossdiff.lazy import exports

__getattr__, __dir__ = exports(__name__, {
    "dry_run": "crossdiff.run.stages", "plan": "crossdiff.run.stages", "run_recipe": "crossdiff.run.stages",
})
