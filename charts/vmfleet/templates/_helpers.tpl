{{/* Names and labels of every object: templates take them from here only. */}}

{{- define "vmfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vmfleet.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "vmfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of one component (no chart version: selectors are immutable). */}}
{{- define "vmfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vmfleet.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* All labels of one component's objects. Call with (dict "root" $ "component" "controller"). */}}
{{- define "vmfleet.labels" -}}
{{ include "vmfleet.selectorLabels" . }}
helm.sh/chart: {{ include "vmfleet.chart" .root }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: vmfleet
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "vmfleet.componentName" -}}
{{- printf "%s-%s" (include "vmfleet.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vmfleet.controllerServiceAccount" -}}
{{- default (include "vmfleet.componentName" (dict "root" . "component" "controller")) .Values.controller.serviceAccount.name -}}
{{- end -}}


{{- define "vmfleet.transferServiceAccount" -}}
{{- include "vmfleet.componentName" (dict "root" . "component" "transfer-worker") -}}
{{- end -}}

{{/* The namespaces the controller handles (watchNamespaces, default the release namespace). */}}
{{- define "vmfleet.watchNamespaces" -}}
{{- if .Values.watchNamespaces -}}
{{- toJson (uniq .Values.watchNamespaces) -}}
{{- else -}}
{{- toJson (list .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{- define "vmfleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "vmfleet.brokerServiceName" -}}
{{- include "vmfleet.componentName" (dict "root" . "component" "broker") -}}
{{- end -}}

{{/*
The bundled broker's credentials, generated once per release and kept across `helm
upgrade` (lookup of the Secrets the chart wrote before), computed once per render and
shared by every template: {"controller": pw, "transfers": pw, "namespaces": {ns: pw}}.
*/}}
{{- define "vmfleet.brokerPasswords" -}}
{{- if not (hasKey .Values "_brokerPasswords") -}}
{{- $controller := include "vmfleet.brokerControllerSecret" . -}}
{{- $nsSecret := include "vmfleet.brokerSecretName" . -}}
{{- $found := lookup "v1" "Secret" .Release.Namespace $controller -}}
{{- $passwords := dict "controller" (randAlphaNum 40) "transfers" (randAlphaNum 40) "namespaces" (dict) -}}
{{- if and $found (hasKey $found.data "password") -}}
{{- $_ := set $passwords "controller" (b64dec (index $found.data "password")) -}}
{{- end -}}
{{- $transfers := lookup "v1" "Secret" .Release.Namespace (include "vmfleet.brokerTransfersSecret" .) -}}
{{- if and $transfers (hasKey $transfers.data "password") -}}
{{- $_ := set $passwords "transfers" (b64dec (index $transfers.data "password")) -}}
{{- end -}}
{{- range $ns := include "vmfleet.brokerNamespaces" . | fromJsonArray -}}
{{- $own := lookup "v1" "Secret" $ns $nsSecret -}}
{{- if and $own (hasKey $own.data "password") -}}
{{- $_ := set $passwords.namespaces $ns (b64dec (index $own.data "password")) -}}
{{- else -}}
{{- $_ := set $passwords.namespaces $ns (randAlphaNum 40) -}}
{{- end -}}
{{- end -}}
{{- $_ := set .Values "_brokerPasswords" $passwords -}}
{{- end -}}
{{- toJson (index .Values "_brokerPasswords") -}}
{{- end -}}

{{/* Namespaces with a broker user and Secret: the watched ones (and with clusterWide, those listed). */}}
{{- define "vmfleet.brokerNamespaces" -}}
{{- include "vmfleet.watchNamespaces" . -}}
{{- end -}}

{{/* The Secret, in each namespace with workers, holding that namespace's broker URL. */}}
{{- define "vmfleet.brokerSecretName" -}}
{{- if .Values.broker.bundled.enabled -}}
{{- include "vmfleet.componentName" (dict "root" . "component" "broker") -}}
{{- else -}}
{{- required "broker.external.existingSecret is required when broker.bundled.enabled is false" .Values.broker.external.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* The Secret (release namespace) holding the controller's broker URL. */}}
{{- define "vmfleet.brokerControllerSecret" -}}
{{- if .Values.broker.bundled.enabled -}}
{{- include "vmfleet.componentName" (dict "root" . "component" "broker-controller") -}}
{{- else -}}
{{- default (include "vmfleet.brokerSecretName" .) .Values.broker.external.controllerSecret -}}
{{- end -}}
{{- end -}}

{{/* The Secret (release namespace) holding the shared transfer worker's broker URL. */}}
{{- define "vmfleet.brokerTransfersSecret" -}}
{{- if .Values.broker.bundled.enabled -}}
{{- include "vmfleet.componentName" (dict "root" . "component" "broker-transfers") -}}
{{- else -}}
{{- default (include "vmfleet.brokerSecretName" .) .Values.broker.external.controllerSecret -}}
{{- end -}}
{{- end -}}

{{- define "vmfleet.brokerHost" -}}
{{- printf "%s.%s.svc" (include "vmfleet.brokerServiceName" .) .Release.Namespace -}}
{{- end -}}

{{/* A redis:// URL of the bundled broker: (dict "root" $ "user" u "password" p). */}}
{{- define "vmfleet.brokerURL" -}}
{{- printf "redis://%s:%s@%s:6379/0" .user .password (include "vmfleet.brokerHost" .root) -}}
{{- end -}}

{{/*
The commands of the broker's users: the same lists as vmfleet/tenancy.py (WORKER_COMMANDS,
CONTROLLER_COMMANDS); tests/unit/test_chart.py holds them equal.
*/}}
{{- define "vmfleet.brokerWorkerCommands" -}}
-@all +@connection +@transaction +@list +@hash +@set +@sortedset +@string +@stream +@scripting +@pubsub +@keyspace +time -@admin -@dangerous -scan -randomkey -dbsize -keys -pubsub -function -fcall -fcall_ro -script|flush -script|kill -move
{{- end -}}

{{- define "vmfleet.brokerControllerCommands" -}}
-@all +@connection +@transaction +@list +@hash +@set +@sortedset +@string +@stream +@scripting +@pubsub +@keyspace +time -@admin -@dangerous -scan -randomkey -dbsize -keys -pubsub -function -fcall -fcall_ro -script|flush -script|kill -move +info
{{- end -}}

{{/* The bundled Redis' ACL file: no default user, the controller, the transfer worker, one user per namespace.
The default user is off (no connection is ever it) but keeps every permission: Redis 7 replays its
append-only file as that user and re-checks each MULTI/EXEC (what every script's writes become)
against it, so a default user without them loses every script's writes (claims, reports) at a
restart (vmfleet.tenancy.DEFAULT_USER_ACL). */}}
{{- define "vmfleet.brokerAcl" -}}
{{- $passwords := include "vmfleet.brokerPasswords" . | fromJson -}}
user default off resetpass ~* &* +@all
user vmfleet-controller on #{{ sha256sum $passwords.controller }} ~vmfleet* &vmfleet* &vmfleet.*:cancels {{ include "vmfleet.brokerControllerCommands" . }}
{{- if .Values.transferWorker.enabled }}
user vmfleet-transfers on #{{ sha256sum $passwords.transfers }} ~vmfleet* &vmfleet* &vmfleet.*:cancels {{ include "vmfleet.brokerWorkerCommands" . }}
{{- end }}
{{- range $ns, $password := $passwords.namespaces }}
user vmfleet-ns-{{ $ns }} on #{{ sha256sum $password }} ~vmfleet.{{ $ns }}:* &vmfleet.{{ $ns }}:* {{ include "vmfleet.brokerWorkerCommands" $ }}
{{- end }}
{{- end -}}

{{/* The controller's broker URL env var: always from a Secret, never a literal value. */}}
{{- define "vmfleet.brokerEnv" -}}
- name: VMFLEET_BROKER_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "vmfleet.brokerControllerSecret" . }}
      key: {{ if .Values.broker.bundled.enabled }}url{{ else }}{{ .Values.broker.external.secretKey }}{{ end }}
{{- end -}}

{{/* Labels the controller puts on the per-VM worker pods (vmfleet/api/constants.py). */}}
{{- define "vmfleet.workerPodSelector" -}}
app.kubernetes.io/name: vmfleet
app.kubernetes.io/component: worker
app.kubernetes.io/managed-by: vmfleet
{{- end -}}

{{/* Label of the Services the ServiceMonitor scrapes. */}}
{{- define "vmfleet.metricsServiceLabel" -}}
vmfleet.io/metrics: "true"
{{- end -}}

{{/* What the controller may do with vmfleet objects, Events and ConfigMaps, and see of
Deployments: every verb here is one the code uses (controller/, kopf's watches), or one a
feature of this release line needs (`create` RemoteCommands: schedules; `get` ConfigMaps:
command templates). With rbac.clusterWide these are cluster-wide. */}}
{{- define "vmfleet.controllerRules" -}}
# get: a RemoteVM the watch has not brought yet; patch: pause on a host-key mismatch, drop
# the finalizer of older versions.
- apiGroups: [vmfleet.io]
  resources: [remotevms]
  verbs: [get, list, watch, patch]
# delete: ttlSecondsAfterFinished, a RemoteCronCommand's history and Replace; create: a
# RemoteCronCommand's runs.
- apiGroups: [vmfleet.io]
  resources: [remotecommands]
  verbs: [get, list, watch, patch, delete, create]
- apiGroups: [vmfleet.io]
  resources: [remotecroncommands]
  verbs: [get, list, watch]
- apiGroups: [vmfleet.io]
  resources: [remotevms/status, remotecommands/status, remotecroncommands/status]
  verbs: [patch]
# spec.templateRef: the template (and, below, its ConfigMap for scriptFrom).
- apiGroups: [vmfleet.io]
  resources: [remotecommandtemplates]
  verbs: [get]
# The worker Deployments' watch (its cache: the controller never reads one by name).
- apiGroups: [apps]
  resources: [deployments]
  verbs: [list, watch]
# The PodDisruptionBudget beside a worker Deployment of several replicas or a pool.
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, create, patch]
# Events of vmfleet objects (the controller's and kopf's): created, never changed.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get]
{{- end -}}

{{/* Worker Deployments, applied server-side (create + patch; never update or delete: the
RemoteVMs own them and the garbage collector removes them). Always in a Role of each
watched namespace, never cluster-wide, and fenced further by the chart's
ValidatingAdmissionPolicy. */}}
{{- define "vmfleet.controllerWorkerRules" -}}
- apiGroups: [apps]
  resources: [deployments]
  verbs: [create, patch]
{{- end -}}

{{/* The output store (a Redis of its own beside the bundled broker): on when both are. */}}
{{- define "vmfleet.outputStoreEnabled" -}}
{{- if and .Values.outputStore.enabled .Values.broker.bundled.enabled -}}true{{- end -}}
{{- end -}}

{{- define "vmfleet.outputStoreName" -}}
{{- include "vmfleet.componentName" (dict "root" . "component" "output-store") -}}
{{- end -}}

{{/* A redis:// URL of the output store: (dict "root" $ "user" u "password" p). */}}
{{- define "vmfleet.outputURL" -}}
{{- printf "redis://%s:%s@%s.%s.svc:6379/0" .user .password (include "vmfleet.outputStoreName" .root) .root.Release.Namespace -}}
{{- end -}}

{{- define "vmfleet.logsApiName" -}}
{{- include "vmfleet.componentName" (dict "root" . "component" "logs-api") -}}
{{- end -}}
