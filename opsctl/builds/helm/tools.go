//go:build tools

// The build's only package: keeps the helm command in this module's graph (go mod tidy).
package tools

import _ "helm.sh/helm/v4/cmd/helm"
