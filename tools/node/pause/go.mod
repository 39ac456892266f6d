// The real test node's pod sandbox ("pause") binary, packed as an OCI image by scripts/node-tools.sh.
module loraplane.local/tools/node/pause

go 1.26.0
