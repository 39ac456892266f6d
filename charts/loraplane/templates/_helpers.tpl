{{/* Parent-only helpers; names, labels, the claim and the security context are in _names.tpl. */}}

{{/* The serving image (serving.image): vLLM, the gateway and the helm test hook run it. */}}
{{- define "loraplane.servingImage" -}}
{{- $i := .Values.serving.image -}}
{{- printf "%s:%s" $i.repository ($i.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* The Secret and key holding vLLM's --api-key: the user's, or the one the chart generates. */}}
{{- define "loraplane.vllmKeySecret" -}}
{{- .Values.serving.apiKeySecret.name | default (printf "%s-vllm-key" (include "loraplane.fullname" .)) -}}
{{- end -}}
{{- define "loraplane.vllmKeyKey" -}}
{{- if .Values.serving.apiKeySecret.name }}{{ .Values.serving.apiKeySecret.key }}{{ else }}api-key{{ end -}}
{{- end -}}

{{/* The Secret holding the gateway's client keys (one per line). */}}
{{- define "loraplane.gatewayKeysSecret" -}}
{{- .Values.gateway.apiKeysSecret.name | default (printf "%s-gateway-keys" (include "loraplane.fullname" .)) -}}
{{- end -}}

{{/* A random secret value that stays the same across upgrades (read back from the live Secret). */}}
{{- define "loraplane.keptRandom" -}}
{{- $existing := lookup "v1" "Secret" .namespace .name -}}
{{- if and $existing $existing.data (index $existing.data .key) -}}
{{- index $existing.data .key -}}
{{- else -}}
{{- randAlphaNum 40 | b64enc -}}
{{- end -}}
{{- end -}}
