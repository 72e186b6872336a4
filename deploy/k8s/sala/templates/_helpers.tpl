{{- define "sala.fullname" -}}{{ printf "%s-sala" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- define "sala.labels" -}}
app.kubernetes.io/name: sala
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}
{{- define "sala.redis" -}}
{{- if .Values.redis.enabled -}}{{ include "sala.fullname" . }}-redis:6379{{- else -}}{{ required "redis.address is needed when redis.enabled is false" .Values.redis.address }}{{- end -}}
{{- end -}}
{{- define "sala.modelVolume" -}}
{{- if .Values.model.volume }}
volumes:
  - name: model
    {{- toYaml .Values.model.volume | nindent 4 }}
{{- end }}
{{- end -}}
{{- define "sala.modelMount" -}}
{{- if .Values.model.volume }}
volumeMounts:
  - name: model
    mountPath: {{ .Values.model.path }}
    readOnly: true
{{- end }}
{{- end -}}
