"""Where Towhee 0.9 looks for pip-installed operators: ``towheeoperator.<namespace>_<name>.<name>``,
class in CamelCase (its loader keeps the namespace's hyphen: ``image-embedding_isc``)."""
from towhee_isc import Isc

__all__ = ['Isc']
