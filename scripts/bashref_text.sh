#!/bin/sh
# The Bash Reference Manual as plain text: one long document (≈112K SmolLM2 tokens) outside the training corpus
# (docs/quality.md §13.3). Debian's bash-doc ships it as an info file; this machine's /usr/share/info, a training
# source, has no bash.info. Keeps "1 Introduction" through Appendix B; drops the licence, the indexes, the tag
# table and the info node headers.  Usage: sh scripts/bashref_text.sh OUT.txt
set -eu
out=${1:?usage: bashref_text.sh OUT.txt}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download bash-doc >/dev/null && dpkg -x bash-doc_*.deb x)
text=$(zcat "$work"/x/usr/share/info/bash.info.gz |
    awk '/^1 Introduction$/ {on = 1} /^Appendix C GNU Free Documentation License$/ {on = 0}
         on && !/^\037/ && !/^File: bash\.info,/')
printf '%s\n' "$text" > "$out"  # $(...) drops the trailing blank lines
echo "wrote $out ($(wc -c < "$out") bytes)"
