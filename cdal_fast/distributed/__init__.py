"""Running ``segment`` on many devices: model-holding workers (shared by Ray actors and local
multi-device runs) and the Ray driver. Ray itself is optional and only imported by :mod:`.ray_runner`."""
