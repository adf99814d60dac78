#!/usr/bin/env bash
# Builds the container image lockstep:<version> without a container engine: an OCI layout in
# build/image/oci and the same as an OCI archive, build/image/lockstep-<version>.oci.tar (what
# `ctr images import` and `skopeo copy oci-archive:` take). Prints the manifest digest.
#
# Contents: the Node 24 runtime we ship, glibc and libstdc++ from the Debian packages this
# machine runs (the only libraries node links), the compiled product (dist/ without tests and
# benchmarks), the .proto files it loads, and the production node_modules. It runs as uid 65532
# and writes nothing outside its mounts, so a read-only root filesystem works.
#
# Reproducible: the same commit, lockfile, runtime and Debian package versions give the same
# digest. Every timestamp is the commit's time (SOURCE_DATE_EPOCH overrides), file owners and
# modes are fixed, the archive is sorted. Run after `npm run build` (`npm run image` does both).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${LOCKSTEP_IMAGE_OUT:-$here/build/image}
version=$(node -p "require('$here/package.json').version")
epoch=${SOURCE_DATE_EPOCH:-$(git -C "$here" log -1 --format=%ct)}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/lockstep/image"
uid=65532

for tool in umoci dpkg-deb apt-get; do
  command -v "$tool" >/dev/null || { echo "image: $tool is missing (scripts/install-debs.sh)" >&2; exit 1; }
done
[ -f "$here/dist/cli/main.js" ] || { echo "image: dist/ is not built (npm run build)" >&2; exit 1; }
node24_bin=$("$here/scripts/node24.sh" 2>/dev/null)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
mkdir -p "$rootfs"

# The C runtime node needs (ldd: libc, libm, libstdc++, libgcc_s), from the installed versions.
mkdir -p "$cache/debs"
for pkg in libc6 libstdc++6 libgcc-s1; do
  ver=$(dpkg-query -W -f='${Version}' "$pkg")
  deb=$(ls "$cache/debs/${pkg}_${ver//:/%3a}_"*.deb 2>/dev/null | head -1 || true)
  if [ -z "$deb" ]; then
    (cd "$cache/debs" && apt-get download -qq -o APT::Sandbox::User=root "$pkg=$ver" >&2)
    deb=$(ls "$cache/debs/${pkg}_${ver//:/%3a}_"*.deb | head -1)
  fi
  dpkg-deb -x "$deb" "$rootfs"
done
# Keep the licences; drop documentation, locales, iconv modules and maintainer tooling.
find "$rootfs/usr/share/doc" -type f ! -name copyright -delete
rm -rf "$rootfs/usr/share/lintian" "$rootfs/usr/share/locale" "$rootfs/usr/share/man" \
  "$rootfs/usr/share/gcc" "$rootfs/usr/lib/x86_64-linux-gnu/gconv" "$rootfs/usr/share/gdb"

# Production dependencies, cached by the lockfile: `npm ci` without dev dependencies or scripts.
lock_key=$(cat "$here/package.json" "$here/package-lock.json" | sha256sum | cut -c1-16)
modules="$cache/node_modules-$lock_key"
if [ ! -d "$modules/node_modules" ]; then
  rm -rf "$modules.tmp"; mkdir -p "$modules.tmp"
  cp "$here/package.json" "$here/package-lock.json" "$modules.tmp/"
  (cd "$modules.tmp" && npm ci --omit=dev --ignore-scripts --no-audit --no-fund --loglevel=error >&2)
  rm -rf "$modules"; mv "$modules.tmp" "$modules"
fi

app="$rootfs/opt/lockstep"
mkdir -p "$app/dist" "$app/bin" "$rootfs/usr/local/bin"
cp "$node24_bin/node" "$rootfs/usr/local/bin/node"
cp "$here/package.json" "$app/"
cp "$here/bin/lockstep.js" "$app/bin/"
for d in cli lib sidecar operator mediator proto; do cp -r "$here/dist/$d" "$app/dist/"; done
find "$app/dist" -name '*.map' -delete
(cd "$here" && find proto -name '*.proto' -exec cp --parents {} "$app/" \;)
cp -r "$modules/node_modules" "$app/"
find "$app/node_modules" \( -name '*.map' -o -name '*.md' -o -name '*.d.ts' -o -name '*.d.mts' -o -name '*.d.cts' \) -delete

mkdir -p "$rootfs/etc" "$rootfs/tmp" "$rootfs/var/lib/lockstep"
printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nlockstep:x:%d:%d:lockstep:/nonexistent:/usr/sbin/nologin\n' $uid $uid > "$rootfs/etc/passwd"
printf 'root:x:0:\nlockstep:x:%d:\n' $uid > "$rootfs/etc/group"

# Fixed owners, modes and times, whatever the umask and clock of the machine that builds it.
chown -R 0:0 "$rootfs"
chmod -R u+rwX,go+rX,go-w "$rootfs"
chmod 1777 "$rootfs/tmp"
chown $uid:$uid "$rootfs/var/lib/lockstep"
find "$rootfs" -exec touch -h -d "@$epoch" {} +

layout="$work/oci"
ref="$layout:$version"
umoci init --layout "$layout"
umoci new --image "$ref"
umoci unpack --image "$ref" "$work/bundle" >/dev/null
rmdir "$work/bundle/rootfs" && mv "$rootfs" "$work/bundle/rootfs"
touch -h -d "@$epoch" "$work/bundle/rootfs"
umoci repack --image "$ref" --refresh-bundle --history.created "$created" \
  --history.created_by "scripts/image.sh" "$work/bundle"
umoci config --image "$ref" --no-history --created "$created" \
  --os linux --architecture amd64 --author "Lockstep" \
  --config.user "$uid:$uid" --config.workingdir / \
  --config.entrypoint /usr/local/bin/node --config.entrypoint /opt/lockstep/bin/lockstep.js \
  --config.env PATH=/usr/local/bin:/usr/bin:/bin --config.env NODE_ENV=production \
  --config.label "org.opencontainers.image.title=lockstep" \
  --config.label "org.opencontainers.image.version=$version" \
  --config.label "org.opencontainers.image.licenses=Apache-2.0" \
  --config.label "org.opencontainers.image.revision=$(git -C "$here" rev-parse HEAD)"
umoci gc --layout "$layout"

rm -rf "$out"; mkdir -p "$out"
cp -r "$layout" "$out/oci"
tar --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner --format=posix \
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
  -C "$layout" -cf "$out/lockstep-$version.oci.tar" .
digest=$(umoci stat --image "$out/oci:$version" --json >/dev/null && \
  node -p "require('$out/oci/index.json').manifests[0].digest")
echo "$digest" > "$out/digest"
echo "lockstep:$version $digest ($(du -k "$out/lockstep-$version.oci.tar" | cut -f1) KiB)" >&2
echo "$digest"
