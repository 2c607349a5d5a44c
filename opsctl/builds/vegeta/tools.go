//go:build tools

// The build's only package: keeps the vegeta command in this module's graph (go mod tidy).
package tools

import _ "github.com/tsenart/vegeta/v12"
