"""The pipeline's stages (one module each) and what they share.

Importing the package turns TensorFlow's and MLflow's console chatter down (tasks/common/console.py): the one
thing done at import, because it must come before TensorFlow is first imported, at the top of a stage's module.
"""

from tasks.common import console

console.quiet_libraries()
