{{- define "margay.labels" -}}
app.kubernetes.io/name: margay
app.kubernetes.io/part-of: margay
{{- end -}}

{{- define "margay.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}
