"""``python -m specontext``: the ``specontext`` command (:mod:`specontext_compiler.cli`), for environments
where the console script is not on PATH."""

import sys

from specontext_compiler.cli import main

if __name__ == "__main__":
    sys.exit(main())
