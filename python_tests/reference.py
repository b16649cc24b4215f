"""The former name of eager_reference.py, kept while test modules still import it from here; ``EagerSAM``
is ``ReferenceSAM`` there. New code imports eager_reference. Delete this file once nothing imports it."""

from eager_reference import *  # noqa: F403
from eager_reference import ReferenceSAM as EagerSAM  # noqa: F401
