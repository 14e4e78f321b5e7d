#!/usr/bin/env bash
# Debian's chromium for the chat page's browser tests (playwright cannot download its own browser here).
# `make install` runs this in the background while Python packages install and the extensions compile.
if [ -x /usr/bin/chromium ]; then
	exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
	start=$(date +%s)
	if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; then
		echo "chromium installed in $(($(date +%s) - start)) s"
	else
		echo "could not install chromium: the browser tests will fail (TRICKLM_SKIP_BROWSER=1 skips them)"
	fi
else
	echo "chromium is missing and only root with apt-get can install it here: install it (apt-get install chromium)"
	echo "or set TRICKLM_SKIP_BROWSER=1 to skip the browser tests"
fi
