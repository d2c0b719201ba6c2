"""The catalogue's tasks, one module each: data, the methods that belong to each, their losses, metrics
and certificates (:mod:`~lipnet.catalogue.tasks.base` has what they share).

:data:`TASKS` lists them in table order: ``classification``, ``attributes``, ``multitask``, ``mil``,
``localisation``, ``scale``, ``cluttered``.
"""

from lipnet.catalogue.tasks.attributes import AttributesTask
from lipnet.catalogue.tasks.base import BASELINE, CatalogueTask, Evaluation, TaskData, TaskSettings
from lipnet.catalogue.tasks.classification import ClassificationTask
from lipnet.catalogue.tasks.cluttered import ClutteredTask
from lipnet.catalogue.tasks.localisation import LocalisationTask
from lipnet.catalogue.tasks.mil import MILTask
from lipnet.catalogue.tasks.multitask import MultitaskTask
from lipnet.catalogue.tasks.scale import ScaleTask

__all__ = [
    "BASELINE",
    "TASKS",
    "AttributesTask",
    "CatalogueTask",
    "ClassificationTask",
    "ClutteredTask",
    "Evaluation",
    "LocalisationTask",
    "MILTask",
    "MultitaskTask",
    "ScaleTask",
    "TaskData",
    "TaskSettings",
]

#: Every task, in table order.
TASKS: dict[str, CatalogueTask] = {
    t.name: t
    for t in (
        ClassificationTask(),
        AttributesTask(),
        MultitaskTask(),
        MILTask(),
        LocalisationTask(),
        ScaleTask(),
        ClutteredTask(),
    )
}
