"""Serving: a FastAPI service (run by uvicorn) for a trained model of either family, with dynamic
batching, a faiss index for large catalogs and new items without retraining. ``lmrec serve`` starts it."""
