#!/usr/bin/env python3
"""Replays a Dockerfile's build stage without a Docker engine, and checks the image it would make.

CI has no Docker engine, so the image is kept buildable this way (`make image-replay`):

1. The final stage names the build stage (`COPY --from=<stage> <binary> <dest>`).
2. That stage's steps run in order in an empty directory standing for the container's `/`:
   `WORKDIR` creates and enters a directory, `COPY` brings from the build context only what it
   names (honouring `.dockerignore`; a wildcard matching nothing is no error, as with BuildKit;
   modification times kept, as Docker keeps them), `ARG`/`ENV` set variables (`--build-arg
   NAME=VALUE` as for `docker build`), `RUN` runs its shell command with `/bin/sh -c` in the
   working directory. Anything else in the build stage is refused, so nothing is skipped
   silently. The host's toolchain stands for the image's: the base image's Rust version is
   compared with the host's and a difference is reported.
3. The binary must come out where the final stage copies it from, and run: the final stage's
   `ENTRYPOINT` + `CMD` with `--print-config` and the final stage's `ENV`, which must serve HTTP
   on 0.0.0.0 at a port the stage `EXPOSE`s.

To save CI time the build shares a target directory (`--target-dir`, default `$CARGO_TARGET_DIR`
or the checkout's `target/`): `<WORKDIR>/target` is a symbolic link to it, so the paths the
Dockerfile uses are the paths checked. `--fresh` uses an empty one, as Docker would.

RUN steps must work relative to the WORKDIR: a command naming an absolute path inside the
container's file system would act on this machine's, and is refused.
"""

import argparse
import fnmatch
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ALLOWED_IN_BUILD_STAGE = {"FROM", "WORKDIR", "COPY", "RUN", "ENV", "ARG", "LABEL"}


class ReplayError(Exception):
    pass


def instructions(text):
    """(line number, INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out = []
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        pending += stripped
        keyword, _, rest = pending.partition(" ")
        out.append((start, keyword.upper(), rest.strip()))
        pending = ""
    if pending:
        raise ReplayError("the Dockerfile ends inside a continued line")
    return out


def stages(text):
    """[{name, image, steps}] in order."""
    result = []
    for number, keyword, rest in instructions(text):
        if keyword == "FROM":
            words = rest.split()
            image = words[0]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            result.append({"name": name, "image": image, "line": number, "steps": []})
        elif not result:
            if keyword != "ARG":
                raise ReplayError(f"line {number}: {keyword} before the first FROM")
        else:
            result[-1]["steps"].append((number, keyword, rest))
    if not result:
        raise ReplayError("no FROM")
    return result


def exec_form(rest):
    rest = rest.strip()
    if rest.startswith("["):
        return re.findall(r'"((?:[^"\\]|\\.)*)"', rest)
    return ["/bin/sh", "-c", rest]


def key_values(rest):
    """`ENV A=1 B="two"` or the legacy `ENV A 1`."""
    words = shlex.split(rest)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(w.split("=", 1) for w in words)


def substitute(text, env):
    return re.sub(
        r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)",
        lambda m: env.get(m.group(1) or m.group(2), ""),
        text,
    )


def dockerignore(context):
    path = os.path.join(context, ".dockerignore")
    patterns = []
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("!"):
                raise ReplayError(f".dockerignore: exceptions ({line}) are not replayed")
            patterns.append(line.strip("/"))
    return patterns


def ignored(relative, patterns):
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in patterns)


def copy(context, patterns, sources, dest, root, workdir):
    """Docker's COPY from the build context: a directory's contents, a file by its name."""
    matched = []
    for source in sources:
        if any(c in source for c in "*?["):
            found = sorted(glob.glob(os.path.join(context, source)))
        else:
            found = [os.path.join(context, source)]
            if not os.path.exists(found[0]):
                raise ReplayError(f"COPY {source}: not in the build context")
        matched += [f for f in found if not ignored(os.path.relpath(f, context), patterns)]
    if not matched:
        raise ReplayError(f"COPY {' '.join(sources)}: no source files")
    target = container_path(root, dest if dest.startswith("/") else os.path.join(workdir, dest))
    into_dir = dest.endswith("/") or len(matched) > 1 or len(sources) > 1
    brought = []
    for path in matched:
        if os.path.isdir(path):
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = [
                    d
                    for d in dirnames
                    if not ignored(os.path.relpath(os.path.join(dirpath, d), context), patterns)
                ]
                for name in filenames:
                    src = os.path.join(dirpath, name)
                    if ignored(os.path.relpath(src, context), patterns):
                        continue
                    dst = os.path.join(target, os.path.relpath(src, path))
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    shutil.copy2(src, dst)
                    brought.append(os.path.relpath(src, context))
        else:
            dst = os.path.join(target, os.path.basename(path)) if into_dir else target
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(path, dst)
            brought.append(os.path.relpath(path, context))
    return brought


def container_path(root, path):
    return os.path.join(root, os.path.normpath(path).lstrip("/"))


def rust_version_of(image):
    m = re.match(r"rust:(\d+\.\d+)", image)
    return m.group(1) if m else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dockerfile")
    parser.add_argument("--context", default=".")
    parser.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--target-dir", default=os.environ.get("CARGO_TARGET_DIR"))
    parser.add_argument("--fresh", action="store_true", help="an empty target directory")
    parser.add_argument("--keep", action="store_true", help="keep the replay's directory")
    args = parser.parse_args()

    started, started_wall = time.monotonic(), time.time()
    context = os.path.abspath(args.context)
    text = open(args.dockerfile).read()
    all_stages = stages(text)
    final = all_stages[-1]
    by_name = {s["name"]: s for s in all_stages if s["name"]}

    # What the final stage takes from the build stage, and how it starts.
    copied, final_env, exposed, entrypoint, cmd = None, {}, set(), [], []
    for number, keyword, rest in final["steps"]:
        if keyword == "COPY" and rest.startswith("--from="):
            words = rest.split()
            copied = (words[0].split("=", 1)[1], words[1], words[2])
        elif keyword == "ENV":
            final_env.update(key_values(rest))
        elif keyword == "EXPOSE":
            exposed.update(p.split("/")[0] for p in rest.split())
        elif keyword == "ENTRYPOINT":
            entrypoint = exec_form(rest)
        elif keyword == "CMD":
            cmd = exec_form(rest)
    if copied is None or copied[0] not in by_name:
        raise ReplayError("the final stage copies nothing from a named build stage")
    stage_name, binary_path, binary_dest = copied
    build = by_name[stage_name]
    print(f"replaying stage `{stage_name}` ({build['image']}, line {build['line']})")

    rust = rust_version_of(build["image"])
    host = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    if rust and not host.startswith(f"rustc {rust}."):
        print(f"  note: the image has Rust {rust}, this replay uses {host}")

    build_args = dict(a.split("=", 1) for a in args.build_arg)
    scratch = tempfile.mkdtemp(prefix="replay-dockerfile-")
    root = os.path.join(scratch, "rootfs")
    os.makedirs(root)
    env = {k: v for k, v in os.environ.items() if k != "CARGO_TARGET_DIR"}
    workdir = "/"
    link = None
    patterns = dockerignore(context)
    try:
        for number, keyword, rest in build["steps"]:
            if keyword not in ALLOWED_IN_BUILD_STAGE:
                raise ReplayError(f"line {number}: {keyword} is not replayed")
            t0 = time.monotonic()
            if keyword == "WORKDIR":
                workdir = os.path.join(workdir, substitute(rest, env))
                os.makedirs(container_path(root, workdir), exist_ok=True)
                if args.target_dir or args.fresh:
                    target = container_path(root, os.path.join(workdir, "target"))
                    shared = os.path.join(scratch, "target") if args.fresh else args.target_dir
                    shared = os.path.abspath(shared)
                    os.makedirs(shared, exist_ok=True)
                    if link is None and not os.path.lexists(target):
                        os.symlink(shared, target)
                        link = target
                        print(f"  {workdir}/target -> {shared}")
                print(f"line {number}: WORKDIR {workdir}")
            elif keyword == "ARG":
                name, _, default = rest.partition("=")
                value = build_args.get(name, default)
                env[name] = value
                print(f"line {number}: ARG {name}={value}")
            elif keyword == "ENV":
                env.update({k: substitute(v, env) for k, v in key_values(rest).items()})
                print(f"line {number}: ENV {rest}")
            elif keyword == "LABEL":
                pass
            elif keyword == "COPY":
                if rest.startswith("--"):
                    raise ReplayError(f"line {number}: COPY {rest.split()[0]} is not replayed")
                words = shlex.split(rest)
                brought = copy(context, patterns, words[:-1], words[-1], root, workdir)
                print(f"line {number}: COPY {rest}  ({len(brought)} files)")
            elif keyword == "RUN":
                if re.search(rf"(^|[\s'\"=:]){re.escape(workdir.rstrip('/'))}(/|\s|$)", rest) and workdir != "/":
                    raise ReplayError(f"line {number}: RUN names {workdir} by its absolute path")
                print(f"line {number}: RUN {rest}", flush=True)
                command = exec_form(rest)
                done = subprocess.run(command, cwd=container_path(root, workdir), env=env)
                if done.returncode != 0:
                    raise ReplayError(f"line {number}: RUN exited with {done.returncode}")
            print(f"  ({time.monotonic() - t0:.0f} s)", flush=True)

        # The binary where the final stage takes it from.
        binary = container_path(root, binary_path)
        if not os.path.isfile(binary) or not os.access(binary, os.X_OK):
            raise ReplayError(f"{binary_path}: the build stage left no executable there")
        if os.path.getmtime(binary) < started_wall:
            raise ReplayError(f"{binary_path}: older than this replay, not built by it")
        print(f"{binary_path}: {os.path.getsize(binary):,} bytes")

        # The image's process: ENTRYPOINT + CMD with the final stage's environment.
        if not entrypoint or entrypoint[0] != binary_dest:
            raise ReplayError(f"ENTRYPOINT {entrypoint} does not start {binary_dest}")
        addr = final_env.get("OUTBOX_CDC_HTTP_ADDR", "")
        host_part, _, port = addr.rpartition(":")
        if host_part != "0.0.0.0" or port not in exposed:
            raise ReplayError(
                f"the image must serve HTTP on 0.0.0.0 at an exposed port: "
                f"ENV OUTBOX_CDC_HTTP_ADDR={addr!r}, EXPOSE {sorted(exposed)}"
            )
        run = [binary] + entrypoint[1:] + cmd + ["--print-config"]
        # As `docker run -e DATABASE_URL=…` gives it: `run` checks its flags before printing.
        env = dict(final_env, DATABASE_URL="postgres://outbox@db/app")
        shown = subprocess.run(run, env=env, capture_output=True, text=True)
        line = f'http_addr = "{addr}"  # environment'
        if shown.returncode != 0 or not re.search(rf"^{re.escape(line)}", shown.stdout, re.M):
            raise ReplayError(
                f"{' '.join(entrypoint + cmd)} --print-config with the image's ENV should show "
                f"`{line}`:\n{shown.stdout}{shown.stderr}"
            )
        print(f"{' '.join(entrypoint + cmd)}: serves {addr} (ENV), EXPOSE {' '.join(sorted(exposed))}")
        print(f"image build replayed in {time.monotonic() - started:.0f} s")
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            if link is not None:
                os.unlink(link)  # the shared target directory stays
            shutil.rmtree(scratch)


if __name__ == "__main__":
    try:
        main()
    except ReplayError as err:
        print(f"replay-dockerfile: {err}", file=sys.stderr)
        sys.exit(1)
