"""What never travels to a cluster: the secret-file patterns left out of every upload.

``SECRET_EXCLUDES`` is the one list. Its patterns are gitignore-style, as Ray reads runtime_env
``excludes`` and ``.rayignore`` (``pathspec`` "gitwildmatch"): a pattern without a ``/`` matches
a file or folder of that name at any depth, a trailing ``/`` matches a folder and everything in
it. They are plain names and ``*`` globs only (no ``!`` negation, no ``/`` inside a pattern
except the trailing one), so rsync's ``--exclude`` reads them the same way.

Where the list applies (docs/reliability.md S8; tests/test_shiplist.py checks every place):

* every Ray upload of a working dir from the repository root (``ray job submit --working-dir .``,
  ``cluster/runtime_env.yaml``, the shipped sweeps): the repository's ``.rayignore``, which Ray
  reads for every working_dir it packs, whatever the runtime_env says, and which holds this list;
* ``scope-ray sweep``: added to each job's runtime_env ``excludes`` (``with_secret_excludes``),
  so a working_dir outside this repository (no ``.rayignore``) is covered too;
* ``ray up``: ``rsync_exclude`` in ``cluster/aws-gpu.yaml``;
* the image: ``cluster/Dockerfile.dockerignore``, each pattern as ``**/PATTERN`` (Docker anchors
  patterns at the context root; ``**/`` makes them match at any depth).

What is not in it, on purpose: a bare ``*token*`` would also drop ``scope_ray/tokens.py`` (the
uploaded working dir shadows the installed package, so the job would fail to import), hence the
narrower token patterns; ``secrets.*`` likewise would drop a module named ``secrets.py``.
"""

from __future__ import annotations

from typing import Any

SECRET_EXCLUDES: tuple[str, ...] = (
    # environment files with keys in them
    ".env",
    ".env.*",
    ".envrc",
    # private keys and certificates
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.keystore",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    # credential folders a home directory holds (copied or symlinked into a checkout)
    ".aws/",
    ".ssh/",
    ".gnupg/",
    ".kube/",
    ".docker/",
    ".azure/",
    "gcloud/",
    ".ray/",
    # credential files
    "*credentials*",
    ".git-credentials",
    ".netrc",
    "_netrc",
    ".pgpass",
    ".pypirc",
    ".npmrc",
    "kubeconfig*",
    "*service-account*.json",
    "secrets.yaml",
    "secrets.yml",
    "secrets.json",
    # tokens: Ray's auth_token, *.token, github-token.txt, hf_token, ... (not tokens.py: see above)
    "*token",
    "*token.*",
    "*.token",
    "*_token_*",
    "*-token-*",
)

# The header .rayignore carries above the list (tests compare the rest with SECRET_EXCLUDES).
RAYIGNORE_HEADER = """\
# Never uploaded to a Ray cluster: Ray reads this file for every working_dir it packs from this
# repository (`ray job submit --working-dir .`, cluster/runtime_env.yaml, the shipped sweeps).
# The list is scope_ray/shiplist.py's SECRET_EXCLUDES, kept equal by tests/test_shiplist.py.
"""


def rayignore_text() -> str:
    """The repository's ``.rayignore``, exactly (a test compares the file with it)."""
    return RAYIGNORE_HEADER + "\n".join(SECRET_EXCLUDES) + "\n"


def with_secret_excludes(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """``runtime_env`` with ``SECRET_EXCLUDES`` added to its ``excludes`` when it uploads local
    files (``working_dir`` or ``py_modules``); unchanged otherwise. The caller's own excludes
    come first and stay."""
    if not (runtime_env.get("working_dir") or runtime_env.get("py_modules")):
        return runtime_env
    own = list(runtime_env.get("excludes") or ())
    return {**runtime_env, "excludes": own + [p for p in SECRET_EXCLUDES if p not in own]}
