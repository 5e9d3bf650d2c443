"""``ds-ext --config cfg.json --module ds_ext.grpo ...`` (or ``python -m ds_ext.grpo`` for one process): the GRPO
command line, :func:`ds_ext.grpo.cli.main` (``examples/grpo.py`` runs the same)."""
from ds_ext.distributed import shutdown
from ds_ext.grpo.cli import main

if __name__ == "__main__":
    main()
    shutdown()  # gloo torn down while the interpreter is alive (ds_ext.distributed.shutdown)
