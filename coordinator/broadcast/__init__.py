"""Broadcast jobs: one message per capable worker, gathered by a chord; the job types and RAG."""
