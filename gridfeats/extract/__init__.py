"""Batch extraction of grid or region features into one HDF5 feature store (``gridfeats extract``).

Modules, one job each:

* :mod:`~gridfeats.extract.sources`: folder / COCO json / path list -> ``ImageItem`` (stable ids);
* :mod:`~gridfeats.extract.loader`: DataLoader workers decode and resize, failures become records;
* :mod:`gridfeats.features` (shared with the service): prepared images -> store records;
* :mod:`~gridfeats.extract.outputs`: shard/rank file names and the final merge (torchrun ranks
  come from :mod:`gridfeats.engine.distributed`);
* :mod:`~gridfeats.extract.job`: the run loop (:func:`run_extraction`), resume, summary;
* :mod:`~gridfeats.extract.cli`: the command line (``docs/extract.md``).

Programmatic use::

    from gridfeats.extract.job import ExtractOptions, run_extraction
    summary = run_extraction(ExtractOptions(input="images/", output="feats.h5", config="R-50-grid",
                                            weights="R-50.pth", mode="grid"))
    print(summary.format())
"""
