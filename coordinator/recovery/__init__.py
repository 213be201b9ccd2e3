"""Recovery: the reaper, which moves a dead worker's queued and running work to live workers."""
