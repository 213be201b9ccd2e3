"""Dispatch: the fleet's Celery app and the router that sends each task to a worker's queue."""
