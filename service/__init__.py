"""The REST feature service: ``gridfeats serve``.

Grid features need no region computation, so an application can ask for them online. This package
serves ``gridfeats extract``'s numbers over HTTP with dynamic batching, bounded queues, input
limits, optional API keys, Prometheus metrics and JSON access logs::

    gridfeats serve --config R-50-grid --weights R-50.pth --max-batch 8 --max-wait-ms 5
    curl -H 'Content-Type: image/jpeg' --data-binary @a.jpg 'localhost:8000/v1/features?mode=grid'
    curl -F images=@a.jpg -F images=@b.png -H 'Accept: application/x-npz' \\
         'localhost:8000/v1/features?mode=region&attr_topk=5' -o feats.npz

Routes: ``POST /v1/features``, ``GET /v1/model``, ``GET /healthz``, ``GET /readyz``,
``GET /metrics``; the OpenAPI schema is at ``/openapi.json`` (browsable at ``/docs``).

Modules, one job each:

* :mod:`~service.settings`: defaults, ``GRIDFEATS_*`` environment variables and flags -> settings;
* :mod:`~service.schemas`: query parameters and answers as pydantic models (the API and its docs);
* :mod:`~service.uploads`: body byte limit, media types, multipart;
* :mod:`~service.batcher`: the generic dynamic batcher (bounded queue, cancellation, isolation);
* :mod:`~service.backend`: the model interface and its implementation on the extraction's path;
* :mod:`~service.runtime`: loading, warm-up, readiness, decode, batched compute with deadlines;
* :mod:`~service.results` / :mod:`~service.encoding`: records -> answers in JSON, .npy or .npz;
* :mod:`~service.auth`: API keys (digests, constant-time comparison);
* :mod:`~service.metrics` / :mod:`~service.access_log`: Prometheus metrics, JSON logs;
* :mod:`~service.app`: routes and error bodies;
* :mod:`~service.server` / :mod:`~service.cli`: running it.
"""
