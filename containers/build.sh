#!/usr/bin/env bash
# Build the pruneflow Apptainer image from containers/prune.def, from any directory:
#
#   containers/build.sh                          # -> containers/prune.sif
#   containers/build.sh /scratch/$USER/prune.sif # elsewhere
#   containers/build.sh --force                  # other options go to `apptainer build` (--notest, ...)
#
# Needs Apptainer (>= 1.1 for unprivileged --fakeroot builds) and internet access for the base image and
# pip, i.e. usually a login node. The build copies this checkout into the image (%files), it does not fetch
# a branch: what you build is what you have checked out. APPTAINER_TMPDIR/APPTAINER_CACHEDIR move the
# ~10 GB of temporary files and cached layers off a small /tmp or $HOME.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")

image=""
options=()
for arg in "$@"; do
    case "$arg" in
        -*) options+=("$arg") ;;
        *)
            if [[ -n "$image" ]]; then
                echo "error: more than one image path given ($image, $arg); usage: containers/build.sh [IMAGE.sif] [apptainer build options]" >&2
                exit 2
            fi
            image=$arg
            ;;
    esac
done
image=${image:-$here/prune.sif}
[[ "$image" == /* ]] || image="$PWD/$image"  # before the cd below

if ! command -v apptainer > /dev/null 2>&1; then
    echo "error: apptainer not found on PATH; build on a machine with Apptainer (often \`module load apptainer\` on a login node; https://apptainer.org/docs/admin/main/installation.html)" >&2
    exit 2
fi

if [[ "$(id -u)" -ne 0 ]]; then
    options=(--fakeroot ${options[@]+"${options[@]}"})  # unprivileged build: root only inside the build's user namespace
fi

cd "$root"  # the %files sources (pyproject.toml, pruneflow/, jobs/, ...) are relative to the repository root
echo "building $image from containers/prune.def (repository $root)"
# ${a[@]+...}: an empty array is "unbound" to `set -u` in bash < 4.4 (RHEL 7 login nodes)
apptainer build ${options[@]+"${options[@]}"} "$image" containers/prune.def
echo "built $image; try: apptainer run $image --help   (details: containers/README.md)"
