{{- define "spark-job.labels" -}}
app.kubernetes.io/name: {{ .Values.job }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: {{ .Values.platform }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
