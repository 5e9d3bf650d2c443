"""Tools over a run's files, above the features: the journal exporters (:mod:`.export`: a DeepSpeed checkpoint;
:mod:`.export_hf`: an HF model directory). The command line is ``python -m ds_ext.recovery export``."""
