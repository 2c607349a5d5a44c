//go:build tools

// The build's only package: keeps the etcd command in this module's graph (go mod tidy).
package tools

import _ "go.etcd.io/etcd/server/v3"
