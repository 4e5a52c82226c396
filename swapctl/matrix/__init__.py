"""The pure core: the set DSL, its compiled program, the solver, fit mode, and the legacy groups."""

from swapctl.matrix.decision import Candidate, Decision, Policy, allowed_part
from swapctl.matrix.fit_solver import FitPolicy
from swapctl.matrix.groups import DEFAULT_GROUP, Group, GroupPolicy
from swapctl.matrix.program import Program, compile_matrix, compile_program, matrix_names
from swapctl.matrix.solver import MatrixPolicy

__all__ = [
    "DEFAULT_GROUP",
    "Candidate",
    "Decision",
    "FitPolicy",
    "Group",
    "GroupPolicy",
    "MatrixPolicy",
    "Policy",
    "Program",
    "allowed_part",
    "compile_matrix",
    "compile_program",
    "matrix_names",
]
