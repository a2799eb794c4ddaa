"""Settings the command line shows in its ``--help``, in a module that imports nothing but ``os``, so
that the parser is built at once: the modules that use them (``postprocess``, ``workflow.milvus``) import
numpy and more, and re-export them from here. Also the CPUs a default number of threads is made of."""
import os

# The winner's post-processing (negative embedding subtraction, ``postprocess``): nearest negatives
# subtracted, weight of the subtraction, repeats, neighbours in the augmentation, its similarity exponent.
K, BETA, ITERATIONS, DBA_K, ALPHA = 10, 0.35, 1, 10, 3.0

# Milvus (``workflow.milvus``).
DEFAULT_MILVUS_URI = './isc.db'  # Milvus Lite: embedded, a folder, nothing to start
INDEX_TYPES = ('FLAT', 'IVF_FLAT', 'HNSW')


def cpu_count() -> int:
    """Cores this process may use (a container's affinity, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
