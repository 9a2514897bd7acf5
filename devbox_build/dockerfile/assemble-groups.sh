#!/bin/sh
# Run by devbox-build in a builder container of the image's base steps (assemble.py), as root:
# installs each pip group on its own into an empty tree and writes the tree as a layer tar whose
# bytes depend on the group's requirements alone.
#
#   assemble-groups.sh WORK VENV GID MTIME OUT TOKEN NAME...
#
# WORK/NAME.txt holds each group's hash-pinned requirements; WORK/uv is the installer (its
# arguments in UV_INSTALL), WORK/bytecode.py the compiler. NAME.tar is written into OUT when
# OUT is the host's folder (its .probe holds TOKEN, and this container can write there): the
# host takes it from there, with no copy.
# Else it is written into WORK, for the host to copy out. Values arrive as arguments, never
# inside this script's text.
set -eu
umask 0002
work=$1 venv=$2 gid=$3 mtime=$4 out=$5 token=$6
shift 6
uv="$work/uv"
chmod 0755 "$uv"
# The trees (and uv's unpacked wheels, hard-linked into them) in WORK/trees: memory, when the
# host mounted a tmpfs there (assemble.trees_in_memory).
trees="$work/trees"
mkdir -p "$trees"
export TMPDIR="$trees"
if grep -q " $trees tmpfs " /proc/mounts; then
    echo "devbox-build: install trees in memory"
else
    echo "devbox-build: install trees on disk"
fi
dest="$work"
if [ -n "$token" ] && [ "$(cat "$out/.probe" 2>/dev/null)" = "$token" ] \
    && (: > "$out/.writable") 2>/dev/null; then
    dest="$out"
fi
echo "devbox-build: layer tars go to $dest"
# Writes the tree of group $name as FOLDER/$name.tar.partial.
layer_tar() {
    tar --sort=name --numeric-owner --format=gnu --mtime="@$mtime" -C "$tree" \
        -cf "$1/$name.tar.partial" --files-from "$work/$name.top"
}
# Settles one installed tree into its layer tar: owners, modes, mtimes, bytecode. Runs while the
# next group installs (CPU here, mostly the network and the disk there).
settle() {
    name=$1 tree="$trees/$1"
    # What a Dockerfile step's install gets from the venv's setgid, group-writable folders: the
    # user's group owns everything it adds, and every folder hands the group on.
    # (A group whose every pin the image below already has installs nothing: no venv tree.)
    if [ -d "$tree$venv" ]; then
        chgrp -R "$gid" "$tree$venv"
        find "$tree$venv" -type d -exec chmod g+s {} +
    fi
    # A folder the steps below already made (/opt, the venv, its site-packages) keeps their
    # owner and mode: the layer's entry for it replaces theirs.
    (cd "$tree" && find . -mindepth 1 -type d) | while IFS= read -r folder; do
        if [ -d "/$folder" ]; then
            chown --reference="/$folder" "$tree/$folder"
            chmod --reference="/$folder" "$tree/$folder"
        fi
    done
    # Fixed mtimes, then bytecode compiled against them (an installer's own would embed the
    # install time and the tree's path); tar gives the bytecode the fixed mtime too.
    find "$tree" -exec touch -h -d "@$mtime" {} +
    if [ -d "$tree$venv" ]; then
        "$venv/bin/python" "$work/bytecode.py" "$tree" "$tree$venv"
    fi
    # Sorted entries, numeric owners, every mtime the fixed one: the same tree gives the same tar.
    (cd "$tree" && ls -A) > "$work/$name.top"
    # A host folder that cannot take it (full) leaves it here, for the host to copy out and
    # say why.
    if ! layer_tar "$dest"; then
        rm -f "$dest/$name.tar.partial"
        [ "$dest" != "$work" ] || exit 1
        dest="$work"
        layer_tar "$dest"
    fi
    mv "$dest/$name.tar.partial" "$dest/$name.tar"
    echo "devbox-build: layer written: $name"
    rm -rf "$tree"
}

settling=""
for name in "$@"; do
    tree="$trees/$name"
    echo "devbox-build: installing $name on its own"
    # A package the image below already has (the venv's own setuptools, say) is uninstalled
    # from it first: the layer whites out what went, as a Dockerfile step's layer would. Only
    # the top-most path gone is written: a folder the new version has again becomes opaque, a
    # path it replaces needs nothing, any other gets a .wh. entry.
    find "$venv" -mindepth 1 | sort > "$work/$name.before"
    sed -E -n 's/^([A-Za-z0-9][A-Za-z0-9._-]*).*/\1/p' "$work/$name.txt" > "$work/$name.names"
    # shellcheck disable=SC2046  # one word per package name
    "$uv" pip uninstall --quiet --no-config --python "$venv/bin/python" \
        $(cat "$work/$name.names")
    # The group goes into its own tree, its scripts run by the venv's Python.
    # shellcheck disable=SC2086  # UV_INSTALL is the install command's words
    "$uv" $UV_INSTALL --python "$venv/bin/python" --prefix "$tree$venv" -r "$work/$name.txt"
    rm -f "$tree$venv/.lock"
    find "$venv" -mindepth 1 | sort > "$work/$name.after"
    comm -23 "$work/$name.before" "$work/$name.after" > "$work/$name.gone"
    awk 'NR == FNR { gone[$0] = 1; next }
         { parent = $0; sub(/\/[^\/]*$/, "", parent); if (!(parent in gone)) print }' \
        "$work/$name.gone" "$work/$name.gone" | while IFS= read -r path; do
        if [ -d "$tree$path" ] && [ ! -L "$tree$path" ]; then
            : > "$tree$path/.wh..wh..opq"
        elif [ ! -e "$tree$path" ] && [ ! -L "$tree$path" ]; then
            mkdir -p "$tree${path%/*}"
            : > "$tree${path%/*}/.wh.${path##*/}"
        fi
    done
    mkdir -p "$tree/opt/devbox/requirements"
    cp "$work/$name.txt" "$tree/opt/devbox/requirements/$name.txt"
    # One tree settles at a time (compiling takes every core); its failure fails the script.
    if [ -n "$settling" ]; then wait "$settling"; fi
    settle "$name" &
    settling=$!
done
if [ -n "$settling" ]; then wait "$settling"; fi
