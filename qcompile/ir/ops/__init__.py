"""The qcompile op set. Importing this package registers every op."""
from qcompile.ir.ops import elementwise, nn, quant, rotation, shape  # noqa: F401
