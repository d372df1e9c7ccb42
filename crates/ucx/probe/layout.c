/* Prints one Rust compile-time assertion for every struct size, field offset
 * and constant that src/sys.rs declares by hand, with the values the
 * installed UCX headers give them. Included into sys.rs by build.rs. */
#include <stddef.h>
#include <stdio.h>
#include <ucp/api/ucp.h>

#define SIZE(T) \
    printf("const _: () = assert!(::core::mem::size_of::<%s>() == %zu, \"size of %s\");\n", \
           #T, sizeof(T), #T); \
    printf("const _: () = assert!(::core::mem::align_of::<%s>() == %zu, \"alignment of %s\");\n", \
           #T, _Alignof(T), #T)
#define OFF(T, f) \
    printf("const _: () = assert!(::core::mem::offset_of!(%s, %s) == %zu, \"offset of %s.%s\");\n", \
           #T, #f, offsetof(T, f), #T, #f)
#define VAL(c) \
    printf("const _: () = assert!(%s as i128 == %lld, \"value of %s\");\n", \
           #c, (long long)(c), #c)

int main(void)
{
    SIZE(ucs_status_t);
    SIZE(ucs_thread_mode_t);
    SIZE(ucp_err_handling_mode_t);
    SIZE(ucs_memory_type_t);
    SIZE(ucs_cpu_set_t);

    SIZE(ucs_sock_addr_t);
    OFF(ucs_sock_addr_t, addr);
    OFF(ucs_sock_addr_t, addrlen);

    SIZE(ucp_params_t);
    OFF(ucp_params_t, field_mask);
    OFF(ucp_params_t, features);
    OFF(ucp_params_t, request_size);
    OFF(ucp_params_t, request_init);
    OFF(ucp_params_t, request_cleanup);
    OFF(ucp_params_t, tag_sender_mask);
    OFF(ucp_params_t, mt_workers_shared);
    OFF(ucp_params_t, estimated_num_eps);
    OFF(ucp_params_t, estimated_num_ppn);
    OFF(ucp_params_t, name);

    SIZE(ucp_worker_params_t);
    OFF(ucp_worker_params_t, field_mask);
    OFF(ucp_worker_params_t, thread_mode);
    OFF(ucp_worker_params_t, cpu_mask);
    OFF(ucp_worker_params_t, events);
    OFF(ucp_worker_params_t, user_data);
    OFF(ucp_worker_params_t, event_fd);
    OFF(ucp_worker_params_t, flags);
    OFF(ucp_worker_params_t, name);
    OFF(ucp_worker_params_t, am_alignment);
    OFF(ucp_worker_params_t, client_id);

    SIZE(ucp_err_handler_t);
    OFF(ucp_err_handler_t, cb);
    OFF(ucp_err_handler_t, arg);

    SIZE(ucp_ep_params_t);
    OFF(ucp_ep_params_t, field_mask);
    OFF(ucp_ep_params_t, address);
    OFF(ucp_ep_params_t, err_mode);
    OFF(ucp_ep_params_t, err_handler);
    OFF(ucp_ep_params_t, user_data);
    OFF(ucp_ep_params_t, flags);
    OFF(ucp_ep_params_t, sockaddr);
    OFF(ucp_ep_params_t, conn_request);
    OFF(ucp_ep_params_t, name);
    OFF(ucp_ep_params_t, local_sockaddr);

    SIZE(ucp_listener_accept_handler_t);
    SIZE(ucp_listener_conn_handler_t);
    OFF(ucp_listener_conn_handler_t, cb);
    OFF(ucp_listener_conn_handler_t, arg);

    SIZE(ucp_listener_params_t);
    OFF(ucp_listener_params_t, field_mask);
    OFF(ucp_listener_params_t, sockaddr);
    OFF(ucp_listener_params_t, accept_handler);
    OFF(ucp_listener_params_t, conn_handler);

    SIZE(ucp_listener_attr_t);
    OFF(ucp_listener_attr_t, field_mask);
    OFF(ucp_listener_attr_t, sockaddr);

    SIZE(ucp_conn_request_attr_t);
    OFF(ucp_conn_request_attr_t, field_mask);
    OFF(ucp_conn_request_attr_t, client_address);
    OFF(ucp_conn_request_attr_t, client_id);

    SIZE(ucp_request_param_t);
    OFF(ucp_request_param_t, op_attr_mask);
    OFF(ucp_request_param_t, flags);
    OFF(ucp_request_param_t, request);
    OFF(ucp_request_param_t, cb);
    OFF(ucp_request_param_t, datatype);
    OFF(ucp_request_param_t, user_data);
    OFF(ucp_request_param_t, reply_buffer);
    OFF(ucp_request_param_t, memory_type);
    OFF(ucp_request_param_t, recv_info);
    OFF(ucp_request_param_t, memh);

    SIZE(ucp_am_handler_param_t);
    OFF(ucp_am_handler_param_t, field_mask);
    OFF(ucp_am_handler_param_t, id);
    OFF(ucp_am_handler_param_t, flags);
    OFF(ucp_am_handler_param_t, cb);
    OFF(ucp_am_handler_param_t, arg);

    SIZE(ucp_am_recv_param_t);
    OFF(ucp_am_recv_param_t, recv_attr);
    OFF(ucp_am_recv_param_t, reply_ep);

    VAL(UCP_API_MAJOR);
    VAL(UCP_API_MINOR);
    VAL(UCS_OK);
    VAL(UCS_INPROGRESS);
    VAL(UCS_ERR_NO_MESSAGE);
    VAL(UCS_ERR_NO_RESOURCE);
    VAL(UCS_ERR_IO_ERROR);
    VAL(UCS_ERR_NO_MEMORY);
    VAL(UCS_ERR_INVALID_PARAM);
    VAL(UCS_ERR_UNREACHABLE);
    VAL(UCS_ERR_INVALID_ADDR);
    VAL(UCS_ERR_NOT_IMPLEMENTED);
    VAL(UCS_ERR_MESSAGE_TRUNCATED);
    VAL(UCS_ERR_NO_DEVICE);
    VAL(UCS_ERR_BUSY);
    VAL(UCS_ERR_CANCELED);
    VAL(UCS_ERR_ALREADY_EXISTS);
    VAL(UCS_ERR_TIMED_OUT);
    VAL(UCS_ERR_UNSUPPORTED);
    VAL(UCS_ERR_REJECTED);
    VAL(UCS_ERR_NOT_CONNECTED);
    VAL(UCS_ERR_CONNECTION_RESET);
    VAL(UCS_ERR_FIRST_LINK_FAILURE);
    VAL(UCS_ERR_LAST_LINK_FAILURE);
    VAL(UCS_ERR_FIRST_ENDPOINT_FAILURE);
    VAL(UCS_ERR_ENDPOINT_TIMEOUT);
    VAL(UCS_ERR_LAST_ENDPOINT_FAILURE);
    VAL(UCS_ERR_LAST);
    VAL(UCS_THREAD_MODE_SERIALIZED);
    VAL(UCP_ERR_HANDLING_MODE_PEER);
    VAL(UCP_PARAM_FIELD_FEATURES);
    VAL(UCP_PARAM_FIELD_NAME);
    VAL(UCP_FEATURE_WAKEUP);
    VAL(UCP_FEATURE_AM);
    VAL(UCP_WORKER_PARAM_FIELD_THREAD_MODE);
    VAL(UCP_WORKER_PARAM_FIELD_FLAGS);
    VAL(UCP_WORKER_PARAM_FIELD_NAME);
    VAL(UCP_WORKER_FLAG_IGNORE_REQUEST_LEAK);
    VAL(UCP_LISTENER_PARAM_FIELD_SOCK_ADDR);
    VAL(UCP_LISTENER_PARAM_FIELD_CONN_HANDLER);
    VAL(UCP_LISTENER_ATTR_FIELD_SOCKADDR);
    VAL(UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR);
    VAL(UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE);
    VAL(UCP_EP_PARAM_FIELD_ERR_HANDLER);
    VAL(UCP_EP_PARAM_FIELD_SOCK_ADDR);
    VAL(UCP_EP_PARAM_FIELD_FLAGS);
    VAL(UCP_EP_PARAM_FIELD_CONN_REQUEST);
    VAL(UCP_EP_PARAMS_FLAGS_CLIENT_SERVER);
    VAL(UCP_EP_CLOSE_FLAG_FORCE);
    VAL(UCP_OP_ATTR_FIELD_CALLBACK);
    VAL(UCP_OP_ATTR_FIELD_USER_DATA);
    VAL(UCP_OP_ATTR_FIELD_DATATYPE);
    VAL(UCP_OP_ATTR_FIELD_FLAGS);
    VAL(UCP_AM_FLAG_WHOLE_MSG);
    VAL(UCP_AM_SEND_FLAG_REPLY);
    VAL(UCP_AM_RECV_ATTR_FIELD_REPLY_EP);
    VAL(UCP_AM_RECV_ATTR_FLAG_DATA);
    VAL(UCP_AM_RECV_ATTR_FLAG_RNDV);
    VAL(UCP_AM_HANDLER_PARAM_FIELD_ID);
    VAL(UCP_AM_HANDLER_PARAM_FIELD_FLAGS);
    VAL(UCP_AM_HANDLER_PARAM_FIELD_CB);
    VAL(UCP_AM_HANDLER_PARAM_FIELD_ARG);
    VAL(UCP_DATATYPE_CONTIG);
    VAL(UCP_DATATYPE_SHIFT);
    printf("const _: () = assert!(UCP_DATATYPE_BYTES as i128 == %lld, \"value of ucp_dt_make_contig(1)\");\n",
           (long long)ucp_dt_make_contig(1));
    return 0;
}
