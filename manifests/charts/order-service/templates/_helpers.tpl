{{- define "order-service.labels" -}}
app.kubernetes.io/name: {{ .Release.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: {{ .Values.platform }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
{{- define "order-service.selector" -}}
app.kubernetes.io/name: {{ .Release.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}
{{- define "order-service.portName" -}}{{ if .Values.port }}http{{ else }}metrics{{ end }}{{- end }}
{{- define "order-service.port" -}}{{ .Values.port | default .Values.metricsPort }}{{- end }}
