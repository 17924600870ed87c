"""Synthetic dual-phase liver CT: the phantom generator behind ``maml phantom``, the tests and the demo model.

Modules: ``phantom`` (a case: ``make_case``), ``scanner`` (protocol, blur and noise), ``contrast``
(tissue HU per phase), ``anatomy`` (the tissue map), ``lesions`` (tumors and liver-labelled mimics),
``breathing`` (the arterial -> venous transform), ``output`` (nnU-Net raw layout, contact sheet).
"""

from .contrast import MIMIC_KINDS, TUMOR_KINDS
from .output import sheet_views, write_case, write_contact_sheet, write_dataset
from .phantom import LABELS, PHASES, SIZES, VISIBLE_HU, PhantomCase, case_id_for_seed, make_case

__all__ = [
    "PhantomCase",
    "make_case",
    "write_case",
    "write_dataset",
    "write_contact_sheet",
    "sheet_views",
    "case_id_for_seed",
    "PHASES",
    "LABELS",
    "SIZES",
    "TUMOR_KINDS",
    "MIMIC_KINDS",
    "VISIBLE_HU",
]
