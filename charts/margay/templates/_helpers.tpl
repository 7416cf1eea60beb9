{{- define "margay.labels" -}}
app.kubernetes.io/name: margay
app.kubernetes.io/part-of: margay
{{- end -}}

{{- define "margay.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}


{{/*
The Lease namespace: Margay's Leases and nobody else's, since the agents
may create and update any Lease in it. Namespaces holding others' Leases
are refused.
*/}}
{{- define "margay.leaseNamespace" -}}
{{- $ns := required "leaseNamespace.name is required" .Values.leaseNamespace.name -}}
{{- if has $ns (list "kube-system" "kube-node-lease" "kube-public" "default") -}}
{{- fail (printf "leaseNamespace.name %s holds other components' Leases; the agents may write every Lease of their Lease namespace: use a namespace of Margay's own (default margay-system)" $ns) -}}
{{- end -}}
{{- $ns -}}
{{- end -}}
