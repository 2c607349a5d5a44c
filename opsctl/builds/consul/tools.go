//go:build tools

// The build's only package: keeps the Consul command in this module's graph (go mod tidy).
package tools

import _ "github.com/hashicorp/consul"
