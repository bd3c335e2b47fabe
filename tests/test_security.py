"""Nobody gets in who does not belong: no shipped config or document starts a server on all
interfaces without authentication, and the cluster YAML holds no secret.

The checker works on text, not on a running cluster:

* Every text file git tracks (YAML, Markdown, shell, Makefile, TOML, .ci/*) is cut into
  statements: YAML strings and comments, lines of shell (backslash continuations joined),
  Markdown code blocks, inline code spans and prose paragraphs. A statement is cut again at
  `&&`, `||` and `;` outside quotes.
* A statement that binds to all interfaces (`--host`, `-h`, `--dashboard-host`, `--bind`, `-b`,
  `MLFLOW_HOST`, `dashboard_host=` with 0.0.0.0, ::, [::] or *) is allowed only as part of
  `mlflow server|ui` carrying `--app-name basic-auth`, or of `ray start` / `ray.init`
  carrying `RAY_AUTH_MODE=token` on the same command. Anything else binding everywhere (another
  server, a bare flag in a document) is reported.
* `RAY_AUTH_MODE=disabled` is reported anywhere: Ray's token authentication stays on.
* The cluster YAML is searched for secrets: AWS key ids and secret-key settings, private key
  blocks, credentials in URLs, long hex strings (a Ray token is 64 hex characters), and
  password/secret/token/key settings with a literal value (a $VARIABLE, a path or a `...`
  placeholder is not a secret).

Each rule is also run on deliberately bad text, so the scan of the real files cannot pass
because it looked at nothing.
"""
from __future__ import annotations

import re
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "ray_cluster.yaml"
SECRETS_DIR = "~/.nq-snn-secrets"  # named in ray_cluster.yaml, README and docs/cluster.md

TEXT_SUFFIXES = {".yaml", ".yml", ".md", ".rst", ".txt", ".sh", ".bash", ".toml", ".cfg", ".ini", ".env"}
TEXT_NAMES = {"Makefile", "Dockerfile", "Procfile"}

# ---------------------------------------------------------------------------- the checker

WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]", "*", "0:0:0:0:0:0:0:0"}

# A flag that picks the listening address, and its value (`--host X`, `--host=X`, `-b X:5000`,
# `MLFLOW_HOST=X`, `dashboard_host="X"`).
BIND = re.compile(
    r"""(?:(?<![\w-])(?:--host|--dashboard-host|--bind|--ip|-h|-b)(?:\s*=\s*|\s+)"""
    r"""|\bMLFLOW_HOST\s*=\s*|\bdashboard_host\s*[=:]\s*)"""
    r"""(?P<value>"[^"]*"|'[^']*'|[^\s`,)]+)"""
)
TRIGGERS = {
    "mlflow": re.compile(r"\bmlflow\s+(?:server|ui)\b"),
    "ray": re.compile(r"\bray\s+start\b|\bray\.init\s*\("),
}
AUTH = {
    "mlflow": re.compile(r"--app-name(?:\s*=\s*|\s+)[\"']?basic-auth\b"),
    "ray": re.compile(r"\bRAY_AUTH_MODE\s*=\s*[\"']?token\b"),
}
AUTH_OFF = re.compile(r"\bRAY_AUTH_MODE\s*[=:]\s*[\"']?disabled\b", re.IGNORECASE)
SEPARATOR = re.compile(r"&&|\|\||;")


def split_commands(line: str) -> list[str]:
    """Cut a line at `&&`, `||` and `;` outside quotes (`python -c 'a; b'` stays whole)."""
    parts, start, quote, i = [], 0, None, 0
    while i < len(line):
        ch = line[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif m := SEPARATOR.match(line, i):
            parts.append(line[start:i])
            start = i = m.end()
            continue
        i += 1
    return parts + [line[start:]]


def host_of(value: str) -> str:
    """The address part of a bind value: strip quotes and a :port."""
    v = value.strip().strip("\"'")
    if v.startswith("["):
        return v[: v.find("]") + 1] if "]" in v else v
    if v.count(":") == 1:
        return v.split(":", 1)[0]
    return v


def is_wildcard(value: str) -> bool:
    return host_of(value) in WILDCARD_HOSTS


def _logical_lines(text: str) -> list[str]:
    """Lines with backslash-newline continuations joined."""
    return re.sub(r"\\[ \t]*\r?\n", " ", text).splitlines()


def _comment_text(line: str) -> str | None:
    m = re.search(r"(?:^|\s)#(.*)$", line)
    return m.group(1) if m else None


def _yaml_strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in _yaml_strings(k) + _yaml_strings(v)]
    if isinstance(node, list):
        return [s for item in node for s in _yaml_strings(item)]
    return []


def _markdown_statements(text: str) -> list[str]:
    out, prose, fence = [], [], None
    for block in re.split(r"(^\s*(?:```|~~~).*$)", text, flags=re.MULTILINE):
        if re.match(r"^\s*(?:```|~~~)", block or ""):
            fence = None if fence else block
            continue
        if fence:  # inside a fenced code block: shell lines
            out += _logical_lines(block)
        else:
            out += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", block)]
            prose.append(re.sub(r"`[^`]*`", " ", block))
    for paragraph in re.split(r"\n\s*\n", "\n".join(prose)):
        out.append(" ".join(paragraph.split()))
    return out


def statements(name: str, text: str) -> list[str]:
    """The pieces of one file in which a command is read as a whole."""
    suffix = Path(name).suffix
    if suffix in (".yaml", ".yml"):
        lines = []
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError:
            docs = []
            lines += _logical_lines(text)
        for s in (s for d in docs for s in _yaml_strings(d)):
            lines += _logical_lines(s)
        comments = "\n".join(c for c in map(_comment_text, text.splitlines()) if c is not None)
        lines += _logical_lines(comments)
    elif suffix in (".md", ".rst", ".txt"):
        lines = _markdown_statements(text)
    else:  # shell, Makefile, TOML, CI scripts
        lines = _logical_lines(text)
    return [p.strip() for line in lines for p in split_commands(line) if p.strip()]


def server_windows(statement: str) -> list[tuple[str, int, int]]:
    """(kind, start, end) for each server command in a statement; the first window also
    covers the text before its command (environment assignments such as RAY_AUTH_MODE=token)."""
    hits = sorted((m.start(), kind) for kind, rx in TRIGGERS.items() for m in rx.finditer(statement))
    return [(kind, 0 if i == 0 else start, hits[i + 1][0] if i + 1 < len(hits) else len(statement))
            for i, (start, kind) in enumerate(hits)]


def exposure_problems(name: str, text: str) -> list[str]:
    """Servers bound to all interfaces without authentication, and Ray auth switched off."""
    problems = [f"{name}: Ray token authentication switched off: {line.strip()!r}"
                for line in text.splitlines() if AUTH_OFF.search(line)]
    for st in statements(name, text):
        windows = server_windows(st)
        for m in BIND.finditer(st):
            if not is_wildcard(m.group("value")):
                continue
            owner = next(((k, a, b) for k, a, b in windows if a <= m.start() < b), None)
            if owner and AUTH[owner[0]].search(st[owner[1]:owner[2]]):
                continue
            what = {None: "binds all interfaces", "mlflow": "MLflow on all interfaces without "
                    "--app-name basic-auth", "ray": "Ray on all interfaces without "
                    "RAY_AUTH_MODE=token"}[owner[0] if owner else None]
            problems.append(f"{name}: {what}: {st!r}")
    return problems


# Secrets in the cluster YAML.
_KEYWORD = r"(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credentials?)"
SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS credential setting": re.compile(
        r"aws_secret_access_key|aws_access_key_id|aws_session_token", re.IGNORECASE),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "credentials in a URL": re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@'\"]+:(?!\$)[^\s/@'\"]+@", re.IGNORECASE),
    "long hex string (a token?)": re.compile(r"(?<![0-9A-Fa-f])[0-9a-fA-F]{32,}(?![0-9A-Fa-f])"),
}
_VALUE = r"""(?P<value>"[^"]*"|'[^']*'|[^\s,}]+)"""
ASSIGNMENTS = (
    # KEY=value anywhere (shell, ini, env files) and `key: value` as a YAML mapping entry
    re.compile(rf"(?P<key>[\w.-]*{_KEYWORD}[\w.-]*)\s*=\s*{_VALUE}", re.IGNORECASE),
    re.compile(rf"^\s*(?:-\s+)?[\"']?(?P<key>[\w.-]*{_KEYWORD}[\w.-]*)[\"']?\s*:\s+{_VALUE}",
               re.IGNORECASE | re.MULTILINE),
)
NOT_A_VALUE = re.compile(r"""^(?:\$.*|[/~.].*|<[^>]*>|\.{3}|x+|X+|\*+|\{\}|\[\]|true|false|null|none|\d{1,4})$""",
                         re.IGNORECASE)
REFERENCE_KEY = re.compile(r"(?:_path|_file|_dir|_uri|_url|_ttl|_name|_env)$", re.IGNORECASE)


def secret_problems(name: str, text: str) -> list[str]:
    problems = [f"{name}: {what}: {m.group(0)[:12]}..."
                for what, rx in SECRET_PATTERNS.items() for m in rx.finditer(text)]
    for m in (m for rx in ASSIGNMENTS for m in rx.finditer(text)):
        value = m.group("value").strip("\"'")
        if value and not NOT_A_VALUE.match(value) and not REFERENCE_KEY.search(m.group("key")):
            problems.append(f"{name}: literal value for {m.group('key')!r}")
    return problems


# ------------------------------------------------------------------------ the shipped files

def shipped_text_files() -> list[Path]:
    """Text files git tracks (the whole tree when this is not a git checkout)."""
    git = shutil.which("git")
    names = None
    if git:
        out = subprocess.run([git, "-C", str(ROOT), "ls-files", "-z"], capture_output=True)
        if out.returncode == 0:
            names = [n for n in out.stdout.decode().split("\0") if n]
    if names is None:
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not any(part in (".git", ".venv", "runs", "ray_results")
                                            for part in p.relative_to(ROOT).parts)]
    keep = [n for n in names if Path(n).suffix in TEXT_SUFFIXES or Path(n).name in TEXT_NAMES
            or n.startswith(".ci/")]
    return [ROOT / n for n in sorted(keep) if (ROOT / n).is_file()]


def test_files_scanned_include_the_cluster_config_and_docs():
    names = {str(p.relative_to(ROOT)) for p in shipped_text_files()}
    assert {"ray_cluster.yaml", "README.md", "Makefile", "pyproject.toml", ".ci/run"} <= names
    # and the scan sees the servers the cluster YAML starts (not an empty statement list)
    kinds = [k for st in statements("ray_cluster.yaml", CLUSTER_YAML.read_text())
             for k, _, _ in server_windows(st)]
    assert kinds.count("mlflow") >= 1 and kinds.count("ray") >= 2


def test_no_shipped_file_starts_a_server_on_all_interfaces_without_auth():
    problems = [p for f in shipped_text_files()
                for p in exposure_problems(str(f.relative_to(ROOT)), f.read_text(errors="replace"))]
    assert not problems, "\n".join(problems)


def test_cluster_yaml_holds_no_secret():
    problems = secret_problems("ray_cluster.yaml", CLUSTER_YAML.read_text())
    assert not problems, "\n".join(problems)


def test_no_shipped_file_holds_a_key():
    high_confidence = ("AWS access key id", "private key", "credentials in a URL")
    problems = [f"{f.relative_to(ROOT)}: {what}"
                for f in shipped_text_files() for what in high_confidence
                if SECRET_PATTERNS[what].search(f.read_text(errors="replace"))]
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------- the checker on bad text

BAD_EXPOSURE = [
    ("ray_cluster.yaml",  # what this repository shipped before
     "head_start_ray_commands:\n  - ray stop\n"
     "  - ray start --head --port=6379 --autoscaling-config=~/ray_bootstrap_config.yaml "
     "--dashboard-host=0.0.0.0\n"
     "  - >-\n    nohup mlflow server --host 0.0.0.0 --port 5000\n"
     "    --backend-store-uri sqlite:////mnt/shared/mlflow/mlflow.db\n"
     "    > /tmp/mlflow-server.log 2>&1 &\n"),
    ("README.md", "2. A server:\n   `mlflow server --backend-store-uri sqlite:////mnt/shared/mlflow.db\n"
                  "   --artifacts-destination /mnt/shared/mlartifacts --host 0.0.0.0 --port 5000`\n"),
    ("docs/x.md", "Start it:\n\n```bash\nmlflow ui -h 0.0.0.0\n```\n"),
    ("docs/y.md", "Run mlflow server with --host=0.0.0.0 so the workers can reach it.\n"),
    ("docs/z.md", "```\nmlflow server --host 0.0.0.0\nmlflow server --app-name basic-auth --host 127.0.0.1\n```\n"),
    ("start.sh", "ray start --head --dashboard-host ::\n"),
    ("start.sh", "ray start --head --dashboard-host '[::]' --port 6379\n"),
    ("start.sh", "export RAY_AUTH_MODE=token; ray start --head --dashboard-host=0.0.0.0\n"),
    ("start.sh", "MLFLOW_HOST=0.0.0.0 mlflow server --port 5000\n"),
    ("start.sh", "gunicorn -b 0.0.0.0:5000 mlflow.server:app\n"),
    ("start.sh", "uvicorn app:app --host 0.0.0.0 --port 8000\n"),
    ("Makefile", "serve:\n\tmlflow server \\\n\t  --host=0.0.0.0 --port 5000\n"),
    ("pyproject.toml", '[tool.x]\ncmd = "ray start --head --dashboard-host=0.0.0.0"\n'),
    ("c.yaml", "cmd: mlflow server --host \"0.0.0.0\" --app-name other\n"),
    ("c.yaml", "# mlflow server --host 0.0.0.0 --port 5000\nkey: 1\n"),
    ("c.yaml", "env:\n  RAY_AUTH_MODE: disabled\n"),
    ("start.sh", "RAY_AUTH_MODE=disabled ray start --head\n"),
]

GOOD_EXPOSURE = [
    ("start.sh", "mlflow server --app-name basic-auth --host 0.0.0.0 --port 5000\n"),
    ("start.sh", "mlflow server --host=0.0.0.0 --app-name=basic-auth\n"),
    ("start.sh", "RAY_AUTH_MODE=token ray start --head --dashboard-host=0.0.0.0\n"),
    ("start.sh", "mlflow server --host 127.0.0.1 --port 5000\n"),
    ("start.sh", "mlflow server --app-name basic-auth --host \"$(hostname -I | awk '{print $1}')\"\n"),
    ("start.sh", "ray start --head --dashboard-host=127.0.0.1\nray start --address=$RAY_HEAD_IP:6379\n"),
    ("start.sh", "df -h /mnt/shared && ssh -N -L 5000:10.0.1.23:5000 ubuntu@head\n"),
    ("docs/ok.md", "MLflow listens on the head's private address; never on all interfaces.\n"),
]


@pytest.mark.parametrize("name,text", BAD_EXPOSURE)
def test_checker_reports_exposed_servers(name, text):
    assert exposure_problems(name, text), f"not reported: {text!r}"


@pytest.mark.parametrize("name,text", GOOD_EXPOSURE)
def test_checker_accepts_authenticated_or_private_servers(name, text):
    assert exposure_problems(name, text) == []


def _fake_token() -> str:
    return secrets.token_hex(32)  # the shape of `ray get-auth-token --generate`


BAD_SECRETS = [
    "provider:\n  type: aws\n  aws_access_key_id: " + "AKIA" + "IOSFODNN7EXAMPLE\n",
    "auth:\n  ssh_user: ubuntu\n  aws_secret_access_key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n",
    "setup_commands:\n  - export MLFLOW_TRACKING_PASSWORD=hunter2hunter2\n",
    "setup_commands:\n  - echo 'export RAY_AUTH_TOKEN=" + _fake_token() + "' >> ~/.bashrc\n",
    "metadata:\n  password: s3cr3t-value\n",
    "metadata:\n  api_key: 'abcd-1234-efgh'\n",
    "head_start_ray_commands:\n  - MLFLOW_FLASK_SERVER_SECRET_KEY=notsorandom mlflow server\n",
    "head_setup_commands:\n  - mlflow server --backend-store-uri postgresql://mlflow:pa55word@db:5432/mlflow\n",
    "file_mounts:\n  /home/ray/key: |\n    -----BEGIN " + "OPENSSH PRIVATE KEY-----\n    b3BlbnNzaA==\n",
]

GOOD_SECRETS = [
    "setup_commands:\n  - export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/home/ray/.nq-snn-secrets/ray_auth_token\n",
    "head_start_ray_commands:\n  - MLFLOW_AUTH_ADMIN_PASSWORD=\"$MLFLOW_TRACKING_PASSWORD\" mlflow server\n",
    "# mlflow.env holds MLFLOW_TRACKING_USERNAME=... / MLFLOW_TRACKING_PASSWORD=...\nkey: 1\n",
    "auth:\n  ssh_user: ubuntu\n  ssh_private_key: ~/.ssh/ray-autoscaler_us-east-1.pem\n",
    "x: MLFLOW_FLASK_SERVER_SECRET_KEY=\"$(python -c 'import secrets; print(secrets.token_hex(32))')\"\n",
    "ImageId: ami-0dd6adfad4ad37eec\n",
]


@pytest.mark.parametrize("text", BAD_SECRETS)
def test_checker_reports_secrets(text):
    assert secret_problems("c.yaml", text), f"not reported: {text!r}"


@pytest.mark.parametrize("text", GOOD_SECRETS)
def test_checker_accepts_references_to_secrets(text):
    assert secret_problems("c.yaml", text) == []


UNSAFE_EDITS = {  # each undoes one protection in the real cluster YAML
    "dashboard on all interfaces, token mode dropped": lambda t: t.replace(
        "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0").replace(
        "RAY_AUTH_MODE=token ray start --head", "ray start --head"),
    "MLflow on all interfaces without basic-auth": lambda t: t.replace(
        "--app-name basic-auth", "--host 0.0.0.0"),
    "token auth switched off in the shells": lambda t: t.replace(
        "export RAY_AUTH_MODE=token", "export RAY_AUTH_MODE=disabled"),
}


@pytest.mark.parametrize("edit", list(UNSAFE_EDITS))
def test_unsafe_edits_of_the_cluster_yaml_are_reported(edit):
    text = CLUSTER_YAML.read_text()
    unsafe = UNSAFE_EDITS[edit](text)
    assert unsafe != text, "the edit no longer applies: update UNSAFE_EDITS"
    assert exposure_problems("ray_cluster.yaml", text) == []
    assert exposure_problems("ray_cluster.yaml", unsafe)


def test_a_secret_added_to_the_cluster_yaml_is_reported():
    text = CLUSTER_YAML.read_text().replace(
        "auth:\n  ssh_user: ubuntu\n", "auth:\n  ssh_user: ubuntu\n  ssh_password: hunter2hunter2\n")
    assert "ssh_password" in text and secret_problems("ray_cluster.yaml", text)


# ---------------------------------------------------------------- the cluster's auth settings

@pytest.fixture()
def cluster():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_ray_token_auth_is_on_for_every_node(cluster):
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for c in cluster[key] if "ray start" in c]
    assert len(starts) == 2 and all(AUTH["ray"].search(c) for c in starts)
    env = " ".join(cluster["setup_commands"])  # every node: shells and the processes ray start forks
    assert AUTH["ray"].search(env)
    token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", env).group(1)
    mounts = cluster["file_mounts"]
    secrets_mount = next(remote for remote, local in mounts.items() if local == SECRETS_DIR)
    assert token_path.startswith(secrets_mount.rstrip("/") + "/")
    assert "--dashboard-host=127.0.0.1" in next(c for c in cluster["head_start_ray_commands"] if "ray start" in c)


def test_mlflow_server_uses_basic_auth_on_a_private_address(cluster):
    (server,) = [c for c in cluster["head_start_ray_commands"] if "mlflow server" in c]
    assert AUTH["mlflow"].search(server) and "--serve-artifacts" in server
    host = BIND.search(server).group("value")
    assert not is_wildcard(host) and "hostname -I" in host
    assert "MLFLOW_AUTH_ADMIN_PASSWORD=\"$MLFLOW_TRACKING_PASSWORD\"" in server
    assert any("mlflow[auth]" in c for c in cluster["head_setup_commands"])
    # the client credentials reach every node from the secrets directory, not from this file
    assert any("/.nq-snn-secrets/mlflow.env" in c for c in cluster["setup_commands"])


def test_readme_states_the_ports_and_the_secrets():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Running on a cluster"):]
    section = section[: section.index("\n## ", 3)]
    for port in ("22/tcp", "8265/tcp", "5000/tcp", "6379/tcp", "2049/tcp"):
        assert f"| {port}" in section or f", {port}" in section, port
    assert SECRETS_DIR in section and "RAY_AUTH_MODE=token" in section and "basic-auth" in section
    assert (ROOT / "docs" / "cluster.md").is_file()


def test_secrets_stay_out_of_the_checkout_and_out_of_git(cluster):
    mounts = cluster["file_mounts"]
    assert SECRETS_DIR in mounts.values()
    assert ".gitignore" in cluster.get("rsync_filter", [])  # ignored copies are not synced either
    git = shutil.which("git")
    if not git or subprocess.run([git, "-C", str(ROOT), "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    for path in (".nq-snn-secrets/ray_auth_token", ".nq-snn-secrets/mlflow.env", "mlflow.env",
                 "ray_auth_token", "basic_auth.ini", "basic_auth.db"):
        ignored = subprocess.run([git, "-C", str(ROOT), "check-ignore", "-q", "--no-index", path])
        assert ignored.returncode == 0, f"{path} is not ignored by git"
