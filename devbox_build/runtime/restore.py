"""devbox-restore: lose the container, keep your setup ("cattle, not pets").

    devbox-restore            the start hook (the entrypoint and a dev container's
                              postStartCommand run it): puts back what lives on the home volume
                              or in git into this fresh container
    devbox-restore --check    what deleting this container now would cost, in three kinds:
                              lost with the container (files outside the volumes changed since
                              it started or since the image was built, git work outside the
                              volumes), kept only on a volume (git work not pushed anywhere),
                              and safe; exit status 1 when anything would be lost
    devbox-restore --check --json

What the start hook restores (each step is idempotent and never stops the container starting):
  home        an empty home (a new volume, a Kubernetes PVC, an EFS mount) gets /etc/skel's
              files; nothing is overwritten
  dotfiles    DEVBOX_DOTFILES (a git URL or path) is cloned to ~/.dotfiles once per volume; its
              install.sh (or bootstrap.sh, setup.sh) runs once per container (what it installs
              outside the home is in the container), else its dotfiles are linked into your home
  ~/.ssh      permissions as ssh demands them (700 for the folder, 600 for keys)
  crontab     ~/.config/devbox/crontab runs in the container (devbox-cron; log in
              ~/.local/state/devbox/cron.log); the runner starts in every container, so a
              crontab written later runs too; a line it cannot read is reported here
  conda envs  each environment under ~/.conda/envs with ipykernel gets its Jupyter kernel
  pip --user  packages you installed (`pip install` installs to ~/.local here) are counted
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import time

from . import contract, cron
from .log import Messages, mask, write_atomic

INSTALL_SCRIPTS = ("install.sh", "install", "bootstrap.sh", "bootstrap", "setup.sh", "setup")
SKEL = "/etc/skel"
# The dotfiles installer ran in this container (not on the volume: what it installs outside the
# home is lost with each container).
DOTFILES_MARKER = "/tmp/devbox-dotfiles-installed"
# Not the user's work, or scratch by design: never reported as lost.
SCRATCH = ("/proc", "/sys", "/dev", "/run", "/tmp", "/var/tmp", "/var/cache", "/var/log",
           "/var/lib/apt/lists")
HOME_SCRATCH = (".cache", ".local/share/jupyter/runtime", ".devcontainer", ".vscode-server")
# What the container runtime writes or binds into every container: neither work nor a volume.
RUNTIME_FILES = ("/.dockerenv", "/etc/mtab", "/etc/hostname", "/etc/hosts", "/etc/resolv.conf")
# What the Dev Container CLI changes in every container it makes (the remapped user, its
# environment patches and their markers): the tool's, not the user's.
DEVCONTAINER_CLI_FILES = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow",
                          "/etc/passwd-", "/etc/group-", "/etc/shadow-", "/etc/gshadow-",
                          "/etc/environment", "/etc/profile", "/var/devcontainer")
VIRTUAL_FILESYSTEMS = {"proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2",
                       "devtmpfs", "securityfs", "debugfs", "overlay"}
GIT_DEPTH = 6  # folders below a search root where repositories are looked for
SHOWN = 20  # paths listed per folder in the console; --json lists them all

say = Messages("devbox-restore")


def home() -> str:
    return os.path.expanduser("~")


def git(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False)


# ---- the start hook

def restore_home(skel: str = SKEL) -> str | None:
    """A home with none of /etc/skel's files gets them (never overwriting)."""
    try:
        names = sorted(os.listdir(skel))
    except OSError:
        return None
    if not names or any(os.path.lexists(os.path.join(home(), n)) for n in names):
        return None
    if not os.access(home(), os.W_OK):
        return None  # the entrypoint says why a home is not writable
    copied = []
    for name in names:
        source, target = os.path.join(skel, name), os.path.join(home(), name)
        if os.path.isdir(source):
            shutil.copytree(source, target, symlinks=True)
        else:
            shutil.copy2(source, target, follow_symlinks=False)
        copied.append(name)
    return f"home: an empty home got {', '.join(copied)} from {skel}"


def restore_dotfiles(marker: str = DOTFILES_MARKER) -> str | None:
    source = os.environ.get("DEVBOX_DOTFILES", "").strip()
    if not source:
        return None
    shown = mask(source)
    folder = contract.home_path(contract.DOTFILES)
    if not os.path.isdir(os.path.join(folder, ".git")):
        cloned = git("clone", "--quiet", "--depth", "1", "--", source, folder)
        if cloned.returncode != 0:
            detail = mask(cloned.stderr.strip().replace(source, shown))[:200]
            return f"dotfiles: could not clone {shown}: {detail}"
    head = git("rev-parse", "HEAD", cwd=folder).stdout.strip()
    try:
        with open(marker) as handle:
            if handle.read().strip() == head:
                return f"dotfiles: {shown} at {head[:12]}, installed in this container"
    except OSError:
        pass
    script = next((os.path.join(folder, name) for name in INSTALL_SCRIPTS
                   if os.path.isfile(os.path.join(folder, name))), None)
    if script:
        os.chmod(script, os.stat(script).st_mode | stat.S_IXUSR)
        ran = subprocess.run([script], cwd=folder, capture_output=True, text=True,
                             timeout=300, check=False)
        if ran.returncode != 0:
            return (f"dotfiles: {os.path.basename(script)} failed ({ran.returncode}): "
                    f"{ran.stderr.strip()[-200:]}")
        done = f"ran {os.path.basename(script)}"
    else:
        linked = []
        for name in sorted(os.listdir(folder)):
            target = os.path.join(home(), name)
            if not name.startswith(".") or name in (".git", ".github", ".gitignore"):
                continue
            if not os.path.lexists(target):
                os.symlink(os.path.join(folder, name), target)
                linked.append(name)
        done = f"linked {', '.join(linked) or 'nothing new'}"
    write_atomic(marker, head + "\n")
    return f"dotfiles: {shown} at {head[:12]}, {done}"


def restore_ssh() -> str | None:
    folder = os.path.join(home(), ".ssh")
    if not os.path.isdir(folder) or os.path.islink(folder):
        return None
    fixed = []
    if stat.S_IMODE(os.stat(folder).st_mode) != 0o700:
        os.chmod(folder, 0o700)
        fixed.append("~/.ssh 700")
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        wanted = 0o644 if name.endswith(".pub") or name == "known_hosts" else 0o600
        if stat.S_IMODE(os.stat(path).st_mode) != wanted:
            os.chmod(path, wanted)
            fixed.append(f"{name} {wanted:o}")
    if not fixed:
        return "~/.ssh: permissions correct"
    return f"~/.ssh: {len(fixed)} permission(s) fixed ({', '.join(fixed)})"


def restore_crontab() -> str | None:
    """Start the runner (it waits for a crontab that does not exist yet); report a broken one."""
    if not os.access(home(), os.W_OK):
        return None
    path = cron.crontab_path()
    report = None
    if os.path.lexists(path):
        try:
            crontab = cron.read(path)
        except cron.CrontabError as exc:
            report = f"crontab: BROKEN, no job runs: {exc}"
        else:
            report = f"crontab: {path}: {len(crontab.jobs)} job(s) run"
            if crontab.problems:
                report += (f"; BROKEN line(s) skipped: {'; '.join(crontab.problems)} "
                           "(devbox-cron --check)")
    started = subprocess.run([os.path.join(contract.BIN, "devbox-cron"), "--detach"],
                             capture_output=True, text=True, timeout=30, check=False)
    if started.returncode != 0:
        return f"crontab: the runner did not start: {started.stderr.strip()}"
    return report


def restore_conda_kernels() -> str | None:
    environments_folder = os.path.join(home(), ".conda", "envs")
    kernels = os.path.join(home(), ".local", "share", "jupyter", "kernels")
    if not os.path.isdir(environments_folder):
        return None
    registered, environments = [], []
    for name in sorted(os.listdir(environments_folder)):
        prefix = os.path.join(environments_folder, name)
        python = os.path.join(prefix, "bin", "python")
        if not os.path.isfile(python):
            continue
        environments.append(prefix)
        spec = os.path.join(kernels, f"conda-{name}", "kernel.json")
        if os.path.isfile(spec):
            continue
        has_kernel = subprocess.run([python, "-c", "import ipykernel"], capture_output=True,
                                    timeout=60, check=False).returncode == 0
        if has_kernel:
            os.makedirs(os.path.dirname(spec), exist_ok=True)
            with open(spec, "w") as handle:
                json.dump({"argv": [python, "-m", "ipykernel_launcher", "-f",
                                    "{connection_file}"],
                           "display_name": f"Python (conda: {name})", "language": "python",
                           "metadata": {"debugger": True}}, handle, indent=1)
            registered.append(name)
    # conda's own list of environments (`conda env list` reads it).
    with open(os.path.join(home(), ".conda", "environments.txt"), "w") as handle:
        handle.writelines(f"{prefix}\n" for prefix in environments)
    return (f"conda: {len(environments)} environment(s) under ~/.conda/envs"
            + (f", kernel registered for {', '.join(registered)}" if registered else ""))


def _listdir(path: str) -> list:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def count_user_packages() -> str | None:
    found = []
    lib = os.path.join(home(), ".local", "lib")
    for version in _listdir(lib):
        found += [n for n in _listdir(os.path.join(lib, version, "site-packages"))
                  if n.endswith(".dist-info")]
    return f"pip --user: {len(found)} package(s) in ~/.local" if found else None


STEPS = (restore_home, restore_dotfiles, restore_ssh, restore_crontab, restore_conda_kernels,
         count_user_packages)


def start_hook() -> int:
    for step in STEPS:
        try:
            result = step()
        except Exception as exc:  # a broken dotfile must never keep the container from starting
            result = f"{step.__name__}: skipped ({exc})"
        if result:
            say(result)
    return 0


# ---- --check

def persistent_mounts(mountinfo: str = "/proc/self/mountinfo") -> list:
    """Mount points that outlive the container: volumes and binds (not its own layer)."""
    mounts = []
    with open(mountinfo) as handle:
        for line in handle:
            left, _, right = line.partition(" - ")
            point = left.split()[4].replace("\\040", " ")
            fstype = right.split()[0]
            if point != "/" and fstype not in VIRTUAL_FILESYSTEMS and point not in RUNTIME_FILES:
                mounts.append(point)
    return sorted(set(mounts))


# Written by the engine when it creates a container (Docker, Podman): their times are the
# container's creation, before which nothing in it was the user's.
CREATION_MARKERS = ("/.dockerenv", "/run/.containerenv")


def container_created() -> float:
    """When this container was made (epoch seconds): the engine's marker file, else when its
    init started (a restarted container: its latest start)."""
    for marker in CREATION_MARKERS:
        try:
            return os.stat(marker).st_mtime
        except OSError:
            continue
    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/1/stat") as handle:
        stat_line = handle.read()
    with open("/proc/uptime") as handle:
        uptime = float(handle.read().split()[0])
    started = int(stat_line[stat_line.rindex(")") + 2:].split()[19]) / ticks
    return time.time() - (uptime - started)


def changed(info: os.stat_result, created: float) -> bool:
    """Changed in this container: written, or put in place (an archive unpacked with its old
    dates, `cp -p`: the change time moves), after the container was made. The image's own files
    carry fixed dates (its layers are reproducible), so they say nothing about the build."""
    return info.st_mtime > created or info.st_ctime > created


def changed_files(created: float, keep: list) -> list:
    skip = (set(SCRATCH) | set(keep) | set(RUNTIME_FILES) | set(DEVCONTAINER_CLI_FILES)
            | {os.path.join(home(), name) for name in HOME_SCRATCH})
    found = []
    for root, dirs, files in os.walk("/"):
        dirs[:] = sorted(d for d in dirs if os.path.join(root, d) not in skip
                         and d != "__pycache__")
        for name in sorted(files):
            path = os.path.join(root, name)
            if path in skip or name.endswith(".pyc"):
                continue
            try:
                if changed(os.lstat(path), created):
                    found.append(path)
            except OSError:
                continue
    return found


def git_repositories(roots: list) -> list:
    repositories = set()
    for top in roots:
        for root, dirs, files in os.walk(top):
            if ".git" in dirs or ".git" in files:
                repositories.add(root)
            depth = root[len(top):].count(os.sep)
            dirs[:] = [d for d in dirs if depth < GIT_DEPTH and not d.startswith(".")
                       and d not in ("node_modules", "__pycache__", "site-packages")]
    return sorted(repositories)


def git_work(repository: str) -> dict | None:
    status = git("status", "--porcelain", cwd=repository)
    if status.returncode != 0:
        return None
    changes = [line for line in status.stdout.splitlines() if line]
    upstream = git("rev-parse", "--abbrev-ref", "@{upstream}", cwd=repository)
    if upstream.returncode == 0:
        unpushed = git("rev-list", "@{upstream}..HEAD", cwd=repository).stdout.split()
        where = upstream.stdout.strip()
    else:
        # No upstream: commits on no remote at all.
        unpushed = git("rev-list", "HEAD", "--not", "--remotes", cwd=repository).stdout.split()
        where = None
    if not changes and not unpushed:
        return None
    return {"repository": repository, "uncommitted": changes, "unpushed_commits": len(unpushed),
            "upstream": where}


def on_volume(path: str, keep: list) -> bool:
    return any(path == point or path.startswith(point.rstrip("/") + "/") for point in keep)


def report(created: float, keep: list) -> dict:
    files = changed_files(created, keep)
    roots = sorted({os.getcwd(), home(), "/workspaces", *keep})
    work = [w for w in (git_work(r) for r in git_repositories(roots)) if w]
    lost_git = [w for w in work if not on_volume(w["repository"], keep)]
    volume_git = [w for w in work if on_volume(w["repository"], keep)]
    return {
        "persistent": keep,
        "container_created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
        "lost_with_container": {"files": files, "git": lost_git},
        "kept_only_on_volume": {"git": volume_git},
        "would_lose_something": bool(files or lost_git),
    }


def print_report(result: dict) -> None:
    keep = result["persistent"]
    print(f"safe (volumes and binds): {', '.join(keep) or 'nothing: no volume is mounted'}")
    lost = result["lost_with_container"]
    if lost["files"]:
        print(f"LOST with the container: {len(lost['files'])} file(s) changed in it, outside "
              "the volumes:")
        by_top: dict = {}
        for path in lost["files"]:
            by_top.setdefault("/".join(path.split("/")[:3]), []).append(path)
        for top, paths in sorted(by_top.items()):
            print(f"  {top}: {len(paths)} file(s)")
            for path in paths[:SHOWN]:
                print(f"    {path}")
    for title, items in (("LOST with the container", lost["git"]),
                         ("kept only on this volume", result["kept_only_on_volume"]["git"])):
        for item in items:
            upstream = item["upstream"] or "no upstream"
            print(f"{title}: git work in {item['repository']}: {len(item['uncommitted'])} "
                  f"uncommitted change(s), {item['unpushed_commits']} commit(s) not pushed "
                  f"({upstream})")
    if not result["would_lose_something"]:
        print("nothing would be lost with the container")


def check(as_json: bool) -> int:
    if not os.path.exists(contract.MANIFEST):
        say(f"{contract.MANIFEST} is missing: not an image built by devbox-build")
        return 2
    result = report(container_created(), persistent_mounts())
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    return 1 if result["would_lose_something"] else 0


def main(argv: list) -> int:
    assert __doc__
    parser = argparse.ArgumentParser(prog="devbox-restore", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--check", action="store_true",
                        help="list what deleting this container now would lose")
    parser.add_argument("--json", action="store_true", help="with --check: one JSON object")
    args = parser.parse_args(argv)
    if args.check:
        return check(args.json)
    return start_hook()
