//go:build tools

// The build's only package: keeps the kind command in this module's graph (go mod tidy).
package tools

import _ "sigs.k8s.io/kind"
